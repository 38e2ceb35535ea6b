"""Constrained decoding for chat: host-side `TokenConstraint`s that the engine turns into masks.

A constraint is made once per completion (`SamplingParams.constraint` is its factory) and asked
before each step for the tokens allowed next, given the tokens generated so far (see
`serve.sampling.TokenConstraint`). Those here read K2's control tokens (shared/K2_FORMAT.md):

- `DenyTokens`: never these ids (`tool_choice: "none"` forbids the tool-call section).
- `ToolCalls`: a tool-call section that must come (`tool_choice` "required" or a named
  function) or that may hold one call only (`parallel_tool_calls: false`):

      [<think> REASONING </think>] <|tool_calls_section_begin|>
        <|tool_call_begin|> functions.NAME:IDX <|tool_call_argument_begin|> ARGS <|tool_call_end|>
        ... (more calls when allowed)
      <|tool_calls_section_end|> <|im_end|>

  When a call is required, K2 Thinking reasons first: a completion that starts outside
  reasoning may begin with `<think>` (and reason freely, without stopping or a call outside a
  section, until `</think>` or the section begin,
  after which the section is forced) or go straight into the section, as the model itself does;
  with thinking off (the prompt pre-fills `<think></think>`) the section is forced at once. The
  call ids are forced token by token to `functions.NAME:IDX`, NAME one of the allowed names and
  IDX the conversation-wide call count; ARGS are free text that may not hold a stop token or
  another marker, ending at `<|tool_call_end|>`. After the last allowed call the section end
  and `<|im_end|>` are forced. With `parallel_tool_calls: false` and no call required, output
  is free until the first `<|tool_call_end|>`, then the section is closed.
- `JsonObject`: `response_format: {"type": "json_object"}`: the answer is one JSON object,
  then `<|im_end|>`, checked token by token by llguidance (the library vLLM uses) through a
  dense bitmask. K2 Thinking reasons first here too: a completion may open with `<think>`
  (or the prompt opened it) and reason freely, but neither stop nor call tools, until
  `</think>`; with thinking off the JSON starts at once. Tools cannot be called.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Sequence

import numpy as np

from k2jax.text import special_tokens as st
from serve.sampling import TokenMask


@dataclasses.dataclass(frozen=True)
class DenyTokens:
    """Factory and constraint at once (it keeps no state): every token but `ids`."""

    ids: tuple[int, ...]

    def __call__(self) -> "DenyTokens":
        return self

    def next_mask(self, generated: Sequence[int]) -> TokenMask:
        return TokenMask(self.ids, deny=True)


@dataclasses.dataclass(frozen=True)
class Markers:
    """The token ids of K2's reasoning and tool-call markers and its stop tokens."""

    think_begin: int
    think_end: int
    section_begin: int
    section_end: int
    call_begin: int
    argument_begin: int
    call_end: int
    im_end: int
    stops: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer) -> "Markers":
        ids = tokenizer.special_id
        return cls(ids(st.THINK_BEGIN), ids(st.THINK_END), ids(st.TOOL_CALLS_SECTION_BEGIN),
                   ids(st.TOOL_CALLS_SECTION_END), ids(st.TOOL_CALL_BEGIN),
                   ids(st.TOOL_CALL_ARGUMENT_BEGIN), ids(st.TOOL_CALL_END), ids(st.IM_END),
                   tuple(tokenizer.stop_ids))

    def not_in_arguments(self) -> tuple[int, ...]:
        """What arguments may not contain: stops and every marker but the call's end."""
        return tuple(sorted({*self.stops, self.think_begin, self.think_end, self.section_begin,
                             self.section_end, self.call_begin, self.argument_begin}))


class _Phase(enum.Enum):
    FREE = enum.auto()           # anything (no call required); watching for a call's end
    START = enum.auto()          # first token: `<think>` or the section begin
    REASONING = enum.auto()      # free but for stop tokens, until `</think>` or the section
    OPEN_SECTION = enum.auto()   # the section begin, forced
    SECTION = enum.auto()        # between calls: the next call's begin or the section's end
    CALL_ID = enum.auto()        # the id, forced along the allowed names
    ARGUMENTS = enum.auto()      # free text but for stops and markers, until the call's end
    CLOSE_SECTION = enum.auto()  # the section end, forced
    END = enum.auto()            # `<|im_end|>`, forced
    DONE = enum.auto()


@dataclasses.dataclass(frozen=True)
class ToolCalls:
    """The factory of one completion's tool-call constraint (see the module docstring).

    Args:
      markers: `Markers.of(tokenizer)`.
      encode: `text -> ids` (the tokenizer's `encode`), for the forced call ids.
      names: the function names a call may name; None leaves ids to the model.
      required: whether the completion must call (otherwise output is free until a call ends).
      max_calls: the most calls in the section (None: any number).
      first_index: IDX of the first call, the number of calls earlier in the conversation.
      starts: "reasoning" (the prompt opened `<think>`), "content" (thinking off: the prompt
        closed it) or "turn" (the model writes `<think>` itself, or not).
    """

    markers: Markers
    encode: object
    names: tuple[str, ...] | None
    required: bool
    max_calls: int | None = None
    first_index: int = 0
    starts: str = "turn"

    def __post_init__(self):
        if self.starts not in ("reasoning", "content", "turn"):
            raise ValueError(f"starts must be 'reasoning', 'content' or 'turn', got {self.starts!r}")
        if self.required and not self.names:
            raise ValueError("a required call needs the names it may call")

    def __call__(self) -> "_ToolCallState":
        return _ToolCallState(self)


class _ToolCallState:
    def __init__(self, spec: ToolCalls):
        self.spec, self.m = spec, spec.markers
        if not spec.required:
            self.phase = _Phase.FREE
        else:
            self.phase = {"reasoning": _Phase.REASONING, "content": _Phase.OPEN_SECTION,
                          "turn": _Phase.START}[spec.starts]
        self.calls = 0
        self.id_tokens: list[int] = []
        self._seen = 0
        self._candidates: dict[int, list[list[int]]] = {}

    def next_mask(self, generated: Sequence[int]) -> TokenMask | None:
        for token in generated[self._seen:]:
            self._advance(token)
        self._seen = len(generated)
        m, phase = self.m, self.phase
        if phase is _Phase.FREE or phase is _Phase.DONE:
            return None
        if phase is _Phase.START:
            return TokenMask((m.think_begin, m.section_begin))
        if phase is _Phase.REASONING:  # no stopping, and calls only inside a section
            return TokenMask((*m.stops, m.call_begin, m.section_end), deny=True)
        if phase is _Phase.OPEN_SECTION:
            return TokenMask((m.section_begin,))
        if phase is _Phase.SECTION:
            if self.calls == 0:
                return TokenMask((m.call_begin,))
            more = self.spec.max_calls is None or self.calls < self.spec.max_calls
            return TokenMask((m.call_begin, m.section_end) if more else (m.section_end,))
        if phase is _Phase.CALL_ID:
            return self._id_mask()
        if phase is _Phase.ARGUMENTS:
            return TokenMask(m.not_in_arguments(), deny=True)
        if phase is _Phase.CLOSE_SECTION:
            return TokenMask((m.section_end,))
        return TokenMask((m.im_end,))  # END

    def _advance(self, token: int) -> None:
        m, phase = self.m, self.phase
        if phase is _Phase.FREE:
            if token == m.call_end:
                self.calls += 1
                if self.spec.max_calls is not None and self.calls >= self.spec.max_calls:
                    self.phase = _Phase.CLOSE_SECTION
            elif token == m.section_end:
                self.calls = 0  # a finished section: the limit is per section
        elif phase in (_Phase.START, _Phase.REASONING):
            if token == m.think_begin:
                self.phase = _Phase.REASONING
            elif token == m.think_end:
                self.phase = _Phase.OPEN_SECTION
            elif token == m.section_begin:
                self.phase = _Phase.SECTION
        elif phase is _Phase.OPEN_SECTION:
            self.phase = _Phase.SECTION
        elif phase is _Phase.SECTION:
            if token == m.call_begin:
                self.phase, self.id_tokens = _Phase.CALL_ID, []
            else:
                self.phase = _Phase.END
        elif phase is _Phase.CALL_ID:
            if token == m.argument_begin:
                self.phase = _Phase.ARGUMENTS
            else:
                self.id_tokens.append(token)
        elif phase is _Phase.ARGUMENTS:
            if token == m.call_end:
                self.calls += 1
                self.phase = _Phase.SECTION
        elif phase is _Phase.CLOSE_SECTION:
            self.phase = _Phase.END
        elif phase is _Phase.END:
            self.phase = _Phase.DONE

    def _id_mask(self) -> TokenMask | None:
        if self.spec.names is None:
            return None
        if self.calls not in self._candidates:
            index = self.spec.first_index + self.calls
            self._candidates[self.calls] = [list(self.spec.encode(f"functions.{name}:{index}"))
                                            for name in self.spec.names]
        prefix, n = self.id_tokens, len(self.id_tokens)
        allowed = {c[n] for c in self._candidates[self.calls] if len(c) > n and c[:n] == prefix}
        if prefix in self._candidates[self.calls]:
            allowed.add(self.m.argument_begin)
        return TokenMask(tuple(sorted(allowed)))


@functools.lru_cache(maxsize=4)
def _llg_tokenizer(tokenizer):
    """llguidance's view of `tokenizer` (about a second for K2's vocabulary: made once)."""
    import llguidance.tiktoken

    return llguidance.tiktoken.lltokenizer_from_encoding(
        tokenizer.tiktoken_encoding, n_vocab=tokenizer.vocab_size, eos_token=tokenizer.im_end_id)


@dataclasses.dataclass(frozen=True, eq=False)
class JsonObject:
    """The factory of one completion's `response_format: json_object` constraint."""

    tokenizer: object
    starts: str = "turn"

    def __post_init__(self):
        import llguidance

        object.__setattr__(self, "_llg", _llg_tokenizer(self.tokenizer))
        object.__setattr__(self, "_grammar",
                           llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}))
        object.__setattr__(self, "_markers", Markers.of(self.tokenizer))

    def __call__(self) -> "_JsonState":
        import llguidance

        return _JsonState(llguidance.LLMatcher(self._llg, self._grammar), self._markers,
                          self.starts, self.tokenizer.vocab_size)


class _JsonState:
    def __init__(self, matcher, markers: Markers, starts: str, vocab: int):
        self.matcher, self.m, self.words = matcher, markers, -(-vocab // 32)
        self.phase = {"reasoning": "reasoning", "content": "json", "turn": "start"}[starts]
        self._seen = 0

    def next_mask(self, generated: Sequence[int]) -> TokenMask | None:
        for token in generated[self._seen:]:
            self._advance(token)
        self._seen = len(generated)
        if self.phase == "reasoning":
            return TokenMask((*self.m.stops, self.m.section_begin, self.m.call_begin), deny=True)
        if self.phase == "done":
            return None
        if self.matcher.is_stopped():  # the JSON is complete: the turn ends
            return TokenMask((self.m.im_end,))
        words = np.frombuffer(self.matcher.compute_bitmask(), np.int32)[:self.words].copy()
        if self.phase == "start":
            words[self.m.think_begin // 32] |= np.int32(np.uint32(1 << self.m.think_begin % 32)
                                                        .view(np.int32))
        return TokenMask(bitmask=words)

    def _advance(self, token: int) -> None:
        if self.phase == "start" and token == self.m.think_begin:
            self.phase = "reasoning"
        elif self.phase == "reasoning":
            if token == self.m.think_end:
                self.phase = "json"
        elif self.phase != "done":
            if self.matcher.is_stopped():
                self.phase = "done"
                return
            self.phase = "json"
            if not self.matcher.consume_token(token) or self.matcher.is_error():
                raise ValueError(f"response_format: token {token} breaks the JSON "
                                 f"({self.matcher.get_error()})")


def prompt_starts(prompt_text: str) -> str:
    """Where a completion of this chat prompt starts: "reasoning", "content" or "turn"."""
    text = prompt_text.rstrip()
    if text.endswith(st.THINK_BEGIN + st.THINK_END):
        return "content"
    return "reasoning" if text.endswith(st.THINK_BEGIN) else "turn"


def for_tool_choice(tokenizer, tool_choice, tools, parallel_tool_calls: bool,
                    prompt_text: str, first_index: int):
    """The constraint factory for a chat request's `tool_choice` and `parallel_tool_calls`
    (None when output is free).

    Args:
      tool_choice: "auto", "none", "required", a function name (the named form), or None.
      tools: the request's tool declarations (validated), or None.
      parallel_tool_calls: False allows one call per message.
      prompt_text: the rendered prompt (does it open or close reasoning?).
      first_index: tool calls earlier in the conversation (the next call's IDX).
    """
    markers = Markers.of(tokenizer)
    if tool_choice == "none":
        return DenyTokens((markers.section_begin, markers.call_begin))
    if not tools:
        return None
    names = tuple(dict.fromkeys(tool["function"]["name"] for tool in tools))
    max_calls = None if parallel_tool_calls else 1
    starts = prompt_starts(prompt_text)
    if tool_choice == "required":
        return ToolCalls(markers, tokenizer.encode, names, True, max_calls, first_index, starts)
    if tool_choice not in (None, "auto"):
        return ToolCalls(markers, tokenizer.encode, (tool_choice,), True, 1, first_index, starts)
    if max_calls is not None:
        return ToolCalls(markers, tokenizer.encode, None, False, max_calls, first_index, starts)
    return None
