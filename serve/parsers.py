"""K2 Thinking's generated text back into OpenAI fields: reasoning, `content` and `tool_calls`,
in one go (`parse_output`) or from streamed text deltas (`OutputParser`).

Reasoning goes out under `reasoning` (vLLM's current name) and `reasoning_content` (DeepSeek's,
and vLLM's before it): both by default, or the one `reasoning_fields` names.

Both run the same state machine, so the deltas of any split of a text add up to the one-shot
result. What it reads (see shared/K2_FORMAT.md):

    [<think>] REASONING </think> CONTENT
    <|tool_calls_section_begin|>
      <|tool_call_begin|> functions.NAME:IDX <|tool_call_argument_begin|> {JSON} <|tool_call_end|>
      ... more calls ...
    <|tool_calls_section_end|> <|im_end|>

and the ways generations stray from it:
- reasoning ends at `</think>` or at the tool section, whichever comes first (K2 Thinking may go
  straight into tool calls); with `starts_in_reasoning` the prompt has already opened `<think>`;
- a call whose id names no function (`k2jax.text.tool_call_ids`: `functions.NAME:IDX`, or
  `NAME:IDX`) is dropped, as vLLM and SGLang drop it; ids are returned as generated;
- text after `<|tool_calls_section_end|>` (or between calls) is layout, not content, as in vLLM
  and SGLang's one-shot parse; a call with no arguments gets `{}`, as vLLM gives it;
- the singular `<|tool_call_section_begin|>` / `..._end|>` spellings; a missing section begin,
  call end or section end; whitespace and newlines around ids and arguments; ids with `-` or `.`;
- a section cut off by `max_tokens`: a call whose arguments had begun is kept with the arguments
  that arrived (they were streamed already), one cut inside its id is dropped;
- control tokens never reach `content`, `reasoning_content` or an id: a streamed delta holds back
  any tail that could still become a marker, and misplaced markers are dropped.
Each field is reported without leading or trailing whitespace; an empty field is None.
"""

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from k2jax.text import special_tokens as st
from k2jax.text.tool_call_ids import tool_name_from_id

REASONING_FIELDS = ("reasoning", "reasoning_content")


class _State(enum.Enum):
    START = enum.auto()      # nothing visible yet: a leading `<think>` opens reasoning
    REASONING = enum.auto()
    CONTENT = enum.auto()
    SECTION = enum.auto()    # in a tool-call section, between calls
    AFTER_SECTION = enum.auto()  # after the section's end: only a stop or more calls count
    CALL_ID = enum.auto()    # after <|tool_call_begin|>
    ARGUMENTS = enum.auto()  # after <|tool_call_argument_begin|>
    DONE = enum.auto()       # after <|im_end|>: nothing more belongs to the message


_SECTION_BEGINS = (st.TOOL_CALLS_SECTION_BEGIN, st.TOOL_CALL_SECTION_BEGIN_SINGULAR)
_SECTION_ENDS = (st.TOOL_CALLS_SECTION_END, st.TOOL_CALL_SECTION_END_SINGULAR)
_CONTROL_MARKERS = tuple(name for name in st.K2_SPECIAL_TOKEN_IDS if name.startswith("<")) + (
    st.TOOL_CALL_SECTION_BEGIN_SINGULAR, st.TOOL_CALL_SECTION_END_SINGULAR)


def _dropping_other_markers(transitions: dict) -> dict:
    """Markers not listed are dropped (None) rather than shown as text."""
    return {marker: None for marker in _CONTROL_MARKERS} | transitions


_ENDS_OF_A_CALL = {st.TOOL_CALL_END: _State.SECTION, st.TOOL_CALL_BEGIN: _State.CALL_ID,
                   st.IM_END: _State.DONE} | {marker: _State.AFTER_SECTION
                                              for marker in _SECTION_ENDS}
_TRANSITIONS: dict[_State, dict[str, _State | None]] = {
    _State.REASONING: _dropping_other_markers(
        {st.THINK_END: _State.CONTENT, st.TOOL_CALL_BEGIN: _State.CALL_ID, st.IM_END: _State.DONE}
        | {marker: _State.SECTION for marker in _SECTION_BEGINS}),
    _State.CONTENT: _dropping_other_markers(
        {st.TOOL_CALL_BEGIN: _State.CALL_ID, st.IM_END: _State.DONE}
        | {marker: _State.SECTION for marker in _SECTION_BEGINS}),
    _State.SECTION: _dropping_other_markers(
        {st.TOOL_CALL_BEGIN: _State.CALL_ID, st.IM_END: _State.DONE}
        | {marker: _State.AFTER_SECTION for marker in _SECTION_ENDS}),
    _State.AFTER_SECTION: _dropping_other_markers(
        {st.TOOL_CALL_BEGIN: _State.CALL_ID, st.IM_END: _State.DONE}
        | {marker: _State.SECTION for marker in _SECTION_BEGINS}),
    _State.CALL_ID: _dropping_other_markers(
        {st.TOOL_CALL_ARGUMENT_BEGIN: _State.ARGUMENTS} | _ENDS_OF_A_CALL),
    # Arguments are free text (a file's contents may mention any marker): only ends of a call count.
    _State.ARGUMENTS: dict(_ENDS_OF_A_CALL),
}
_MARKER_PATTERNS = {state: re.compile("|".join(map(re.escape, transitions)))
                    for state, transitions in _TRANSITIONS.items()}
_LONGEST_MARKER = {state: max(map(len, transitions)) for state, transitions in _TRANSITIONS.items()}


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Whether generation starts inside reasoning (templates that pre-fill `<think>`)."""
    return prompt_text.rstrip().endswith(st.THINK_BEGIN)


@dataclass
class ParsedDelta:
    """What one streamed text delta adds. `tool_calls` holds OpenAI stream deltas: a call's first
    one carries `index`, `id`, `type` and `function.name`; later ones `index` and argument text."""
    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning_content or self.content or self.tool_calls)

    def to_openai(self, reasoning_fields: Sequence[str] = REASONING_FIELDS) -> dict:
        """The non-empty fields, as a chat-completion chunk's `delta` carries them; reasoning
        under each name in `reasoning_fields`."""
        delta = {name: self.reasoning_content for name in reasoning_fields
                 if self.reasoning_content}
        return delta | {key: value for key, value in (("content", self.content),
                                                      ("tool_calls", self.tool_calls)) if value}


@dataclass(frozen=True)
class ParsedMessage:
    """A whole generated message; `tool_calls` in OpenAI shape
    (`{"id", "type": "function", "function": {"name", "arguments"}}`, arguments a JSON string)."""
    reasoning_content: str | None
    content: str | None
    tool_calls: list[dict]

    def to_openai(self, reasoning_fields: Sequence[str] = REASONING_FIELDS) -> dict:
        """An OpenAI assistant message (`tool_calls` only when there are some); reasoning
        under each name in `reasoning_fields`."""
        message = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            message |= dict.fromkeys(reasoning_fields, self.reasoning_content)
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


class _TrimmedField:
    """Streams a field without its leading and trailing whitespace: whitespace is held back until
    visible text follows it, and dropped when the field closes."""

    def __init__(self):
        self._started = False
        self._held = ""

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held + text
        visible = text.rstrip()
        self._held = text[len(visible):]
        return visible

    def close(self) -> None:
        self._held = ""


class OutputParser:
    """Incremental parser: `feed(text_delta)` for each delta, then `finish()`; each returns a
    `ParsedDelta`, and `result()` the message so far."""

    def __init__(self, *, starts_in_reasoning: bool = False):
        self._state = _State.REASONING if starts_in_reasoning else _State.START
        self._pending = ""  # received text not yet attributed (may end in a marker's prefix)
        self._finished = False
        self._reasoning, self._content = _TrimmedField(), _TrimmedField()
        self._reasoning_parts: list[str] = []
        self._content_parts: list[str] = []
        self._calls: list[dict] = []
        self._argument_parts: list[list[str]] = []
        self._call_id = ""
        self._arguments = _TrimmedField()
        self._open_call: int | None = None  # index of the call whose arguments are streaming
        self._delta = ParsedDelta()

    def feed(self, text: str) -> ParsedDelta:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._pending += text
        self._run(final=False)
        return self._take_delta()

    def finish(self) -> ParsedDelta:
        """Ends the text: whatever was held back as a possible marker prefix is text after all."""
        if not self._finished:
            self._run(final=True)
            if self._state is not _State.CALL_ID:  # a call cut off inside its id is dropped
                self._leave(_State.DONE)
            self._finished = True
        return self._take_delta()

    def result(self) -> ParsedMessage:
        calls = [{**call, "function": {**call["function"], "arguments": "".join(parts)}}
                 for call, parts in zip(self._calls, self._argument_parts)]
        return ParsedMessage("".join(self._reasoning_parts) or None,
                             "".join(self._content_parts) or None, calls)

    def _run(self, final: bool) -> None:
        if self._state is _State.START:
            visible = self._pending.lstrip()
            if visible.startswith(st.THINK_BEGIN):
                self._pending = visible[len(st.THINK_BEGIN):]
                self._state = _State.REASONING
            elif st.THINK_BEGIN.startswith(visible) and not final:
                return  # may still become `<think>`
            else:
                self._state = _State.CONTENT
        while self._state is not _State.DONE:
            match = _MARKER_PATTERNS[self._state].search(self._pending)
            if match is None:
                break
            self._text(self._pending[:match.start()])
            self._pending = self._pending[match.end():]
            next_state = _TRANSITIONS[self._state][match.group()]
            if next_state is not None:
                self._leave(next_state)
                self._enter(next_state)
        if self._state is _State.DONE:
            self._pending = ""
            return
        cut = len(self._pending) if final else self._partial_marker_start()
        self._text(self._pending[:cut])
        self._pending = self._pending[cut:]

    def _partial_marker_start(self) -> int:
        """Where the longest tail of the pending text that could begin a marker starts."""
        markers = _TRANSITIONS[self._state]
        position = self._pending.find("<", max(0, len(self._pending) - _LONGEST_MARKER[self._state] + 1))
        while position != -1:
            tail = self._pending[position:]
            if any(marker.startswith(tail) for marker in markers):
                return position
            position = self._pending.find("<", position + 1)
        return len(self._pending)

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._state is _State.REASONING:
            self._add_reasoning(self._reasoning.push(text))
        elif self._state is _State.CONTENT:
            self._add_content(self._content.push(text))
        elif self._state is _State.CALL_ID:
            self._call_id += text
        elif self._state is _State.ARGUMENTS and self._open_call is not None:
            self._add_arguments(self._open_call, self._arguments.push(text))
        # Text between calls or after the section is layout, not content.

    def _leave(self, next_state: _State) -> None:
        if self._state is _State.REASONING:
            self._reasoning.close()
        elif self._state is _State.CONTENT:
            self._content.close()
        elif self._state is _State.CALL_ID:
            self._start_call(self._call_id.strip())
            if next_state is not _State.ARGUMENTS:
                self._close_call()
        elif self._state is _State.ARGUMENTS:
            self._arguments.close()
            self._close_call()

    def _close_call(self) -> None:
        """Ends the open call; one with no argument text gets `{}` (what a call of a function
        without parameters sends, and what clients can `json.loads`)."""
        if self._open_call is not None and not self._argument_parts[self._open_call]:
            self._add_arguments(self._open_call, "{}")
        self._open_call = None

    def _enter(self, state: _State) -> None:
        self._state = state
        if state is _State.CALL_ID:
            self._call_id = ""
            self._open_call = None
        elif state is _State.ARGUMENTS:
            self._arguments = _TrimmedField()

    def _start_call(self, call_id: str) -> None:
        name = tool_name_from_id(call_id)
        if name is None:  # names no function: the call cannot be used (its arguments are dropped)
            return
        self._open_call = len(self._calls)
        call = {"id": call_id, "type": "function",
                "function": {"name": name, "arguments": ""}}
        self._calls.append(call)
        self._argument_parts.append([])
        self._delta.tool_calls.append({"index": self._open_call, **call,
                                       "function": dict(call["function"])})

    def _add_reasoning(self, text: str) -> None:
        if text:
            self._reasoning_parts.append(text)
            self._delta.reasoning_content += text

    def _add_content(self, text: str) -> None:
        if text:
            self._content_parts.append(text)
            self._delta.content += text

    def _add_arguments(self, index: int, text: str) -> None:
        if not text:
            return
        self._argument_parts[index].append(text)
        stream = self._delta.tool_calls
        if stream and stream[-1]["index"] == index:
            stream[-1]["function"]["arguments"] += text
        else:
            stream.append({"index": index, "function": {"arguments": text}})

    def _take_delta(self) -> ParsedDelta:
        delta, self._delta = self._delta, ParsedDelta()
        return delta


def parse_output(text: str, *, starts_in_reasoning: bool = False) -> ParsedMessage:
    """One-shot parse of a whole generated message (text decoded with the markers kept)."""
    parser = OutputParser(starts_in_reasoning=starts_in_reasoning)
    parser.feed(text)
    parser.finish()
    return parser.result()
