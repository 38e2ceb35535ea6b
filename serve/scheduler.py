"""Continuous batching: sequences, their stop conditions, and the scheduler that moves them
between the waiting queue and the engine's batch slots.

Between decode steps the scheduler admits waiting sequences into free slots (when the page pool
holds their prompt), finishes the ones that stopped, and, when the pool runs dry mid-decode,
preempts the most recently arrived sequence: its pages are released and it waits again with
its generated tokens, to be re-prefilled later (recompute preemption). Its sampling keys depend
only on its seed and step count, so resuming continues the same stream.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence as Seq

from serve.paged_cache import PageAllocator
from serve.sampling import SamplingParams

Detokenize = Callable[[Seq[int]], str]
DECODE_CONTEXT_TOKENS = 4


@dataclasses.dataclass(eq=False)
class Sequence:
    """One completion being generated: prompt, output so far, and where its cache lives."""

    request_id: int
    index: int  # which of the request's `n` completions
    prompt: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    arrival: int
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    slot: int | None = None
    pages: list[int] = dataclasses.field(default_factory=list)
    num_cached: int = 0  # leading `cache_tokens` whose entries are in the cache
    sent_tokens: int = 0  # tokens and text already reported to a stream
    sent_text: int = 0
    # `text` of the first `_text_tokens` generated tokens, ending on a whole character: later
    # steps decode only the tokens after it.
    _settled_text: str = ""
    _text_tokens: int = 0

    @property
    def cache_tokens(self) -> list[int]:
        """Tokens whose entries must be cached before the next decode step: the prompt and
        every generated token but the last, which that step consumes."""
        return self.prompt + self.generated[:-1]

    @property
    def needs_prefill(self) -> bool:
        return self.num_cached < len(self.prompt) + max(len(self.generated) - 1, 0)

    @property
    def ready_for_decode(self) -> bool:
        return bool(self.generated) and not self.needs_prefill and self.finish_reason is None

    def append(self, token: int, logprob: float, top: dict[int, float] | None,
               detokenize: Detokenize | None, max_seq_len: int) -> None:
        """Records a sampled token and decides whether the sequence is finished."""
        self.generated.append(token)
        if self.params.logprobs is not None:
            self.logprobs.append(logprob)
            if self.params.logprobs:
                self.top_logprobs.append(dict(list(top.items())[:self.params.logprobs]))
        if detokenize is not None:
            self.text = self._decode(detokenize)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif self.text is not None and self._cut_at_stop_string():
            self.finish_reason = "stop"
        elif (len(self.generated) >= self.params.max_new_tokens
              or len(self.prompt) + len(self.generated) > max_seq_len):
            # The next decode would cache the last token at position len - 1, past the cache.
            self.finish_reason = "length"

    def _decode(self, detokenize: Detokenize) -> str:
        """`detokenize(generated)`, decoding only the tokens since the text last ended on a
        whole character, after a few settled ones as context (a tokenizer may render a piece
        differently at the start of a text)."""
        start = max(self._text_tokens - DECODE_CONTEXT_TOKENS, 0)
        context = detokenize(self.generated[start:self._text_tokens])
        tail = detokenize(self.generated[start:])
        if tail.startswith(context):
            text = self._settled_text + tail[len(context):]
        else:  # the context renders differently with what follows: decode it all
            text = detokenize(self.generated)
        if not text.endswith("\ufffd"):
            self._settled_text, self._text_tokens = text, len(self.generated)
        return text

    def _cut_at_stop_string(self) -> bool:
        found = [i for i in (self.text.find(s) for s in self.params.stop) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
        return bool(found)

    def text_delta(self) -> str | None:
        """Text not yet streamed that can no longer change: held back are a trailing partial
        UTF-8 character (U+FFFD) and a tail that could still grow into a stop string."""
        if self.text is None:
            return None
        end = len(self.text)
        if self.finish_reason is None:
            end = len(self.text.rstrip("\ufffd"))
            for stop in self.params.stop:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if self.text[end - k:end] == stop[:k]:
                        end -= k
                        break
        end = max(end, self.sent_text)
        delta, self.sent_text = self.text[self.sent_text:end], end
        return delta


def bucket(n: int, limit: int, minimum: int = 1) -> int:
    """The power of two >= n (at least `minimum`), capped at `limit`: one compile per bucket."""
    size = minimum
    while size < n:
        size *= 2
    return min(size, limit)


class Scheduler:
    """Waiting queue, `max_batch` slots and the page allocator.

    With an allocator of several shards (one per device of a mesh) the slots are split evenly
    between them, slot s in shard `s // (max_batch / num_shards)`: a sequence takes its pages
    from its slot's shard, so its rows and its cache live on the same device.

    Args:
      max_batch: number of slots (rows of the decode batch).
      allocator: the page pool's `PageAllocator`.
      prefix_sharing: let sequences reuse indexed prompt pages.
    """

    def __init__(self, max_batch: int, allocator: PageAllocator, prefix_sharing: bool = True):
        if max_batch % allocator.num_shards:
            raise ValueError(f"max_batch={max_batch} does not split over the "
                             f"{allocator.num_shards} shards of the page pool")
        self.allocator = allocator
        self.prefix_sharing = prefix_sharing
        self.slots: list[Sequence | None] = [None] * max_batch
        self.slots_per_shard = max_batch // allocator.num_shards
        self.waiting: collections.deque[Sequence] = collections.deque()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def shard_of(self, seq: Sequence) -> int:
        """The pool shard of a sequence holding a slot."""
        return seq.slot // self.slots_per_shard

    def _free_slots(self, shard: int) -> list[int]:
        start = shard * self.slots_per_shard
        return [s for s in range(start, start + self.slots_per_shard) if self.slots[s] is None]

    def _choose_shard(self, tokens) -> int:
        """The shard for a new sequence: one with a free slot, preferring the longest shared
        prefix, then the most free pages."""
        def score(shard):
            shared = (self.allocator.indexed_prefix_len(tokens, len(tokens) - 1, shard)
                      if self.prefix_sharing else 0)
            return shared, self.allocator.free_in(shard)

        return max((k for k in range(self.allocator.num_shards) if self._free_slots(k)),
                   key=score)

    def admit(self) -> list[Sequence]:
        """Moves waiting sequences, first come first served, into free slots while the pool
        holds their cache tokens plus the next one.

        A sequence whose first page equals that of one admitted in the same call waits a step,
        so that it can share that page once it is written rather than compute it again.
        """
        admitted, firsts, deferred = [], set(), []
        size = self.allocator.page_size
        while self.waiting and None in self.slots:
            seq = self.waiting.popleft()
            tokens = seq.cache_tokens
            first = tuple(tokens[:size]) if len(tokens) > size else None
            if self.prefix_sharing and first is not None and first in firsts:
                deferred.append(seq)
                continue
            shard = self._choose_shard(tokens)
            shared = (self.allocator.match_prefix(tokens, len(tokens) - 1, shard)
                      if self.prefix_sharing else [])
            fresh = self.allocator.allocate(
                self.allocator.pages_for(len(tokens) + 1) - len(shared), shard)
            if fresh is None:
                self.allocator.release(shared)
                self.waiting.appendleft(seq)
                break
            seq.pages, seq.num_cached = shared + fresh, len(shared) * size
            seq.slot = self._free_slots(shard)[0]
            self.slots[seq.slot] = seq
            admitted.append(seq)
            firsts.add(first)
        self.waiting.extendleft(reversed(deferred))
        return admitted

    def reserve_decode_pages(self, ready: list[Sequence]) -> list[Sequence]:
        """Gives every sequence in `ready` a page for the position its next decode writes,
        preempting the latest arrivals of its shard when the shard's pages run out. Returns the
        preempted ones."""
        preempted = []
        for seq in sorted(ready, key=lambda s: s.arrival):
            if seq.slot is None:
                continue
            shard = self.shard_of(seq)
            while len(seq.pages) * self.allocator.page_size <= seq.num_cached:
                page = self.allocator.allocate(1, shard)
                if page is not None:
                    seq.pages += page
                    continue
                victim = max((s for s in self.running if self.shard_of(s) == shard),
                             key=lambda s: s.arrival)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
        return preempted

    def _preempt(self, seq: Sequence) -> None:
        self.release(seq)
        seq.num_cached = 0
        self.waiting.appendleft(seq)

    def release(self, seq: Sequence) -> None:
        """Frees a sequence's slot and pages (finished or preempted)."""
        self.allocator.release(seq.pages)
        seq.pages = []
        if seq.slot is not None:
            self.slots[seq.slot] = None
            seq.slot = None
