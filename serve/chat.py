"""Chat on top of generation: conversations rendered with K2 Thinking's template, outputs parsed
into `reasoning_content`, `content` and `tool_calls`.

    results = serve.generate((config, params), [{"role": "user", "content": "Hi"}],
                             tokenizer=tokenizer, tools=tools, max_tokens=256)
    results[0].reasoning_content, results[0].content, results[0].tool_calls

`serve.generate` hands a conversation (a list of message dicts) or a list of conversations to
`generate_chat`. The prompt is `apply_chat_template` with tool-call ids in the history rewritten
as `functions.NAME:IDX` (K2 degrades over turns with ids of another shape), generation stops at
`<|im_end|>` or `[EOS]`, and text is decoded with the special tokens dropped except the
reasoning and tool-call markers, which the parser reads. The HTTP server uses the same pieces.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping, Sequence

from k2jax.text.chat_template import ChatPrompt, apply_chat_template
from serve import generation, heavy as heavy_mode
from serve.engine import Completion, GenerationResult
from serve.parsers import ParsedMessage, parse_output, prompt_opens_reasoning
from serve.sampling import SamplingParams


def render(tokenizer, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
           *, thinking: bool = True, preserve_thinking: bool = False) -> ChatPrompt:
    """The prompt for a conversation in the tokenizer's chat format, ending with the assistant
    turn's header (and an empty `<think></think>` when `thinking` is off)."""
    return apply_chat_template(tokenizer, messages, tools, normalize_tool_call_ids=True,
                               thinking=thinking, preserve_thinking=preserve_thinking)


def detokenizer(tokenizer):
    """`ids -> text` for chat outputs: control tokens dropped, the parser's markers kept."""
    return functools.partial(tokenizer.decode, skip_special_tokens=True)


def with_chat_stops(params: SamplingParams, tokenizer) -> SamplingParams:
    """`params` that also stop at `<|im_end|>` and `[EOS]`."""
    extra = tuple(t for t in tokenizer.stop_ids if t not in params.stop_token_ids)
    return dataclasses.replace(params, stop_token_ids=params.stop_token_ids + extra)


def finish_reason(engine_reason: str | None, has_tool_calls: bool) -> str | None:
    """OpenAI's reason: "length" when cut by max_tokens or the context (reasoning counts
    against max_tokens), else "tool_calls" when the message calls tools, else "stop"."""
    if engine_reason is None or engine_reason == "length":
        return engine_reason
    return "tool_calls" if has_tool_calls else "stop"


def is_conversation(prompt) -> bool:
    """Whether `prompt` is one conversation: a non-empty list of message mappings."""
    return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and bool(prompt)
            and all(isinstance(m, Mapping) for m in prompt))


def is_chat(prompts) -> bool:
    """Whether `generate` was given a conversation or a list of conversations."""
    return is_conversation(prompts) or (
        isinstance(prompts, Sequence) and not isinstance(prompts, str) and bool(prompts)
        and all(is_conversation(p) for p in prompts))


@dataclasses.dataclass
class ChatCompletion(Completion):
    """A completion with its text parsed as an assistant message; `finish_reason` is OpenAI's
    ("tool_calls" when it calls tools)."""

    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[dict] = dataclasses.field(default_factory=list)
    reasoning = property(lambda self: self.reasoning_content)  # vLLM's current name

    def message(self) -> dict:
        """The OpenAI assistant message."""
        return ParsedMessage(self.reasoning_content, self.content, self.tool_calls).to_openai()


@dataclasses.dataclass
class ChatResult(GenerationResult):
    """A conversation's result; with n = 1, `reasoning_content`, `content` and `tool_calls`
    read its completion. In heavy mode `candidates` holds the candidate answers."""

    prompt_text: str = ""
    candidates: list[ChatCompletion] | None = None

    reasoning_content = property(lambda self: self._only().reasoning_content)
    reasoning = reasoning_content
    content = property(lambda self: self._only().content)
    tool_calls = property(lambda self: self._only().tool_calls)


def parse_completion(completion: Completion, prompt_text: str) -> ChatCompletion:
    """`completion` with its text parsed (decoded by `detokenizer`: markers kept)."""
    parsed = parse_output(completion.text or "",
                          starts_in_reasoning=prompt_opens_reasoning(prompt_text))
    fields = {f.name: getattr(completion, f.name) for f in dataclasses.fields(Completion)}
    fields["finish_reason"] = finish_reason(completion.finish_reason, bool(parsed.tool_calls))
    return ChatCompletion(**fields, reasoning_content=parsed.reasoning_content,
                          content=parsed.content, tool_calls=parsed.tool_calls)


def generate_chat(model_or_checkpoint, conversations, *, tokenizer, tools=None,
                  heavy: int | None = None, sampling_params=None, **kwargs) -> list[ChatResult]:
    """`serve.generate` for conversations; returns one `ChatResult` per conversation.

    Args:
      model_or_checkpoint: a checkpoint path or `(config, params)`.
      conversations: one conversation (a list of OpenAI message dicts) or a list of them.
      tokenizer: a `K2Tokenizer` (required: the template needs its control tokens).
      tools: OpenAI tool declarations, offered in every conversation.
      heavy: when set (>= 2), that many candidate answers per conversation, then an
        aggregation pass whose answer is the result (`serve.heavy`).
      sampling_params, **kwargs: as for `serve.generate` (sampling parameters and engine
        options); `<|im_end|>` and `[EOS]` are added to the stop tokens.
    """
    if tokenizer is None:
        raise ValueError("chat prompts need a tokenizer (tokenizer=...)")
    if heavy is not None and (not isinstance(heavy, int) or heavy < 2):
        raise ValueError(f"heavy must be an integer >= 2 (the number of candidates), got {heavy!r}")
    if is_conversation(conversations):
        conversations = [conversations]
    engine_options, sampling_kwargs = generation.split_options(kwargs)
    params = [with_chat_stops(p, tokenizer) for p in generation.params_per_prompt(
        len(conversations), sampling_params, sampling_kwargs, "conversations")]
    model = generation.load_model(model_or_checkpoint,
                                  generation.resolve_mesh(engine_options))
    run = functools.partial(_run, model, tokenizer, engine_options=engine_options)
    if heavy is None:
        return run(conversations, tools, params)
    first = run(conversations, tools, [dataclasses.replace(p, n=heavy) for p in params])
    final_conversations = [
        heavy_mode.aggregation_messages(conversation, [c.message() for c in result.outputs])
        for conversation, result in zip(conversations, first)]
    results = run(final_conversations, tools, params)
    for result, candidates in zip(results, first):
        result.candidates = candidates.outputs
    return results


def _run(model, tokenizer, conversations, tools, params, *, engine_options) -> list[ChatResult]:
    prompts = [render(tokenizer, conversation, tools) for conversation in conversations]
    prompt_ids = [p.token_ids for p in prompts]
    text = types.SimpleNamespace(decode=detokenizer(tokenizer))
    engine = generation.make_engine(model, prompt_ids, params, text, **engine_options)
    for _ in generation.run_engine(engine, prompt_ids, params):
        pass
    results = []
    for request_id, prompt in enumerate(prompts):
        result = engine.pop_result(request_id)
        outputs = [parse_completion(c, prompt.text) for c in result.outputs]
        results.append(ChatResult(result.request_id, result.prompt_token_ids, outputs,
                                  prompt_text=prompt.text))
    return results
