"""From engine deltas to OpenAI chat output, for the server: one `OutputParser` per choice.

`ChatChoices.feed` turns each engine `StreamDelta` into the chunks a stream sends
(`reasoning` / `reasoning_content`, `content`, `tool_calls` deltas, then an empty delta with the finish
reason); `choices()` gives the whole messages for a non-streaming response. Both come from the
same parsers, so a stream's deltas add up to the non-streaming message.

With `logprobs`, every generated token is reported, as vLLM does: reasoning, content and the
tool-call section alike (the stop token included), in generation order. A stream sends the
logprobs of an engine delta's tokens on the first chunk that delta produces (an empty delta
when its text is held back), so the chunks' logprobs add up to the non-streaming ones.
"""

from __future__ import annotations

import dataclasses

from serve import chat, openai_protocol as proto
from serve.engine import StreamDelta
from serve.engine_loop import EngineLoop, RequestStream
from serve.parsers import REASONING_FIELDS, OutputParser, prompt_opens_reasoning
from serve.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class FinalRequest:
    """The engine request whose output is the response, and the tokens spent before it
    (heavy mode: the candidates' prompt and outputs, and the candidate messages)."""

    prompt_text: str
    prompt_ids: list[int]
    params: SamplingParams
    prior_prompt_tokens: int = 0
    prior_completion_tokens: int = 0
    candidates: list[dict] | None = None

    def usage(self, completion_tokens: int) -> dict:
        return proto.usage(self.prior_prompt_tokens + len(self.prompt_ids),
                           self.prior_completion_tokens + completion_tokens)


class ChatChoices:
    """Parse state of a chat request's `n` completions; reasoning goes out under each name in
    `reasoning_fields`."""

    def __init__(self, n: int, prompt_text: str, tokenizer=None, logprobs: bool = False,
                 reasoning_fields=REASONING_FIELDS):
        self.reasoning_fields = tuple(reasoning_fields)
        opens = prompt_opens_reasoning(prompt_text)
        self.parsers = [OutputParser(starts_in_reasoning=opens) for _ in range(n)]
        self.reasons: list[str | None] = [None] * n
        self.completion_tokens = 0
        self.tokenizer = tokenizer
        self.logprobs = logprobs and tokenizer is not None
        self.tokens: list[tuple[list, list, list]] = [([], [], []) for _ in range(n)]

    def feed(self, delta: StreamDelta) -> list[tuple[int, dict, str | None, dict | None]]:
        """The `(choice index, OpenAI delta, finish_reason, logprobs)` chunks of one delta."""
        parser = self.parsers[delta.index]
        self.completion_tokens += len(delta.token_ids)
        parsed = parser.feed(delta.text or "")
        chunks = [(delta.index, parsed.to_openai(self.reasoning_fields), None)] if parsed else []
        if delta.finish_reason is not None:
            last = parser.finish()
            if last:
                chunks.append((delta.index, last.to_openai(self.reasoning_fields), None))
            reason = chat.finish_reason(delta.finish_reason, bool(parser.result().tool_calls))
            self.reasons[delta.index] = reason
            chunks.append((delta.index, {}, reason))
        chunks = [(*chunk, None) for chunk in chunks]
        logprobs = self._logprobs(delta)
        if logprobs is not None:
            if not chunks:
                chunks = [(delta.index, {}, None, None)]
            chunks[0] = (*chunks[0][:3], logprobs)
        return chunks

    def _logprobs(self, delta: StreamDelta) -> dict | None:
        if not self.logprobs or not delta.token_ids or delta.logprobs is None:
            return None
        ids, lps, tops = self.tokens[delta.index]
        ids += delta.token_ids
        lps += delta.logprobs
        tops += delta.top_logprobs or [{}] * len(delta.token_ids)
        return proto.chat_logprobs(self.tokenizer, delta.token_ids, delta.logprobs,
                                   delta.top_logprobs)

    def feed_all(self, deltas: list[StreamDelta]) -> None:
        for delta in deltas:
            self.feed(delta)

    def choices(self) -> list[dict]:
        """The non-streaming `choices`: each completion's whole message and finish reason."""
        return [proto.chat_choice(i, parser.result().to_openai(self.reasoning_fields), reason, self._all_logprobs(i))
                for i, (parser, reason) in enumerate(zip(self.parsers, self.reasons))]

    def _all_logprobs(self, index: int) -> dict | None:
        if not self.logprobs:
            return None
        return proto.chat_logprobs(self.tokenizer, *self.tokens[index])


async def run_to_end(loop: EngineLoop, stream: RequestStream, on_deltas=None):
    """Consumes `stream` (calling `on_deltas` with each list of deltas); returns its result.
    If the caller is cancelled first (the client left), the engine request is cancelled."""
    try:
        async for deltas in stream:
            if on_deltas is not None:
                on_deltas(deltas)
        return stream.result
    finally:
        if stream.result is None:
            loop.cancel(stream)
