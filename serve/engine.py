"""The generation engine: continuous batching over a paged latent cache.

Each `step()`:
  1. admits waiting sequences into free slots (`Scheduler.admit`),
  2. prefills them, a chunk of at most `prefill_chunk` tokens per sequence per step, and samples
     the first token of each whose prompt is complete,
  3. runs one decode step over the occupied slots, one token each,
  4. retires the sequences that stopped (eos / stop ids / stop strings / max_new_tokens).

Prefill and decode are one jitted forward (`_forward`, absorbed MLA over the pages) followed
by the jitted sampler (`_sample`), with static shapes from buckets: rows a power of two up to
`max_batch`, prompt chunks a power of two from 16 up to `prefill_chunk`, page-table width a
power of two. Sampling options are run-time values, so a stream of requests reuses a handful of
compiled programs whatever parameters they bring.

Failure isolation: the host-side work done for one request (its sampling row, penalty row,
appending a token, stop strings, text) runs under `_isolated`; an exception there fails only
that request: it is dropped like an abort (slots and pages freed) and its exception waits in
`pop_failures()` for whoever drives the engine. The batch's forward and sampler touch shared
state (the donated pools), so an exception from them propagates and the engine must not be
used again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

import k2jax
from k2jax import param_sharding, sharding
from k2jax.config import ModelConfig
from serve import paged_cache, sampling
from serve.paged_cache import PageAllocator
from serve.sampling import SamplingParams
from serve.scheduler import Detokenize, Scheduler, Sequence, bucket

MIN_PREFILL_BUCKET = 16
# Attention over this many positions costs next to nothing next to the weights; reading at
# least that much spares recompiling while short sequences grow.
MIN_CONTEXT_BUCKET = 128


@dataclasses.dataclass
class Completion:
    """One generated completion. `token_ids` are generated tokens only (the stop token
    included); `text` is None without a detokenizer; `logprobs` when requested."""

    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


@dataclasses.dataclass
class GenerationResult:
    """The result for one prompt: its `n` completions in `outputs`.

    `token_ids`, `text`, `finish_reason` and `logprobs` read the completion when n = 1.
    """

    request_id: int
    prompt_token_ids: list[int]
    outputs: list[Completion]

    def _only(self) -> Completion:
        if len(self.outputs) != 1:
            raise AttributeError(f"this result has n={len(self.outputs)} completions; "
                                 "read them from .outputs")
        return self.outputs[0]

    token_ids = property(lambda self: self._only().token_ids)
    text = property(lambda self: self._only().text)
    finish_reason = property(lambda self: self._only().finish_reason)
    logprobs = property(lambda self: self._only().logprobs)
    top_logprobs = property(lambda self: self._only().top_logprobs)


@dataclasses.dataclass(frozen=True)
class StreamDelta:
    """New output of one completion in one step (`finish_reason` set on its last delta)."""

    request_id: int
    index: int
    token_ids: list[int]
    logprobs: list[float] | None
    text: str | None
    finish_reason: str | None
    top_logprobs: list[dict[int, float]] | None = None  # per token, when logprobs >= 1


@functools.partial(jax.jit, static_argnames=("config", "mesh", "serving_layout"),
                   donate_argnames="pools")
def _forward(config, params, pools, tokens_bt, positions_bt, table_bw, last_b, mesh=None,
             serving_layout=True):
    """Writes `tokens` into the pages; returns the logits at `last_b` of each row `[B, V]` and
    the pools. Traced inside `sharding.activate(mesh)` when on a mesh; `params` in the serving
    layout or the checkpoint's (`serving_layout`)."""
    cache = paged_cache.with_page_table(pools, table_bw, mesh)
    logits_b1v, cache = k2jax.forward_cached(config, params, tokens_bt, positions_bt, cache,
                                             logits_index_b=last_b,
                                             serving_layout=serving_layout)
    return logits_b1v[:, 0], paged_cache.pools_of(cache)


def _sample_rows(logits_bv, penalty, slots_b, row_floats, row_ints, steering):
    """Samples each row and counts the tokens of rows kept (`slots_b` in range of `penalty`)."""
    prompt_mask_sv, counts_sv = penalty
    rows = functools.partial(jnp.take, indices=slots_b, axis=0, mode="fill", fill_value=0)
    out = sampling.sample(logits_bv, row_floats, row_ints,
                          lambda: (rows(prompt_mask_sv), rows(counts_sv)), steering)
    counts_sv = counts_sv.at[slots_b, out.tokens].add(1, mode="drop")
    return out, (prompt_mask_sv, counts_sv)


@functools.partial(jax.jit, static_argnames="mesh", donate_argnames="penalty")
def _sample(logits_bv, penalty, slots_b, row_floats, row_ints, steering, mesh=None):
    """Samples each row and counts the tokens of rows kept.

    A program of its own: it compiles once per batch bucket (and bias / mask width), not once
    per model shape. `penalty` is `(prompt_mask [max_batch, V], counts [max_batch, V])` by
    slot; `steering` the rows' `sampling.Steering`; `slots_b` each row's slot within its pool
    shard (`slots_per_shard`: none). Returns `(Sampled, penalty)`.

    On a mesh every device samples its own block of rows with the full vocabulary of those
    rows only, and holds the penalty rows of its own slots: no device gathers the `[B, V]`
    logits of the batch, and each row's arithmetic is the single-device sampler's, so tokens,
    penalties and logprobs are exactly those of one device.
    """
    if mesh is None:
        return _sample_rows(logits_bv, penalty, slots_b, row_floats, row_ints, steering)
    rows = paged_cache.rows_sharding(mesh).spec
    # Nothing here crosses devices; the sampler's `lax.cond`s mix per-device values with
    # constants, which the varying-axes check would reject.
    return jax.shard_map(_sample_rows, mesh=mesh, in_specs=(rows,) * 6, out_specs=(rows, rows),
                         check_vma=False)(
        logits_bv, penalty, slots_b, row_floats, row_ints, steering)


@functools.partial(jax.jit, donate_argnames="penalty")
def _set_penalty_row(penalty, slot, prompt_mask_v, counts_v):
    prompt_mask_sv, counts_sv = penalty
    return prompt_mask_sv.at[slot].set(prompt_mask_v), counts_sv.at[slot].set(counts_v)


def uses_serving_layout() -> bool:
    """Whether the engine computes with the serving layout (`k2jax.model`): one subtree per
    layer, which XLA:CPU reads where it lies instead of copying a layer (and the page pool it
    updates) out of a stacked array. Accelerators slice stacked layers in place, so there the
    engine keeps the checkpoint's tree as loaded and holds no second copy of the weights."""
    return jax.default_backend() == "cpu"


def _place_params(config: ModelConfig, params, mesh, serving_layout: bool):
    """The weights on device once, not per step, in the layout the engine computes with. On a
    mesh every leaf goes to its sharding under the rules (`param_sharding.param_shardings`, of
    the serving layout where used), so each device holds only its part; leaves already placed
    there (`k2jax.load(path, mesh)`) stay as they are."""
    if serving_layout:
        params = k2jax.to_serving_layout(params)
    if mesh is None:
        return jax.tree.map(jnp.asarray, params)
    return jax.device_put(params, param_sharding.param_shardings(config, mesh, params,
                                                           serving_layout=serving_layout))


def lower_step(config: ModelConfig, mesh, *, rows: int, tokens_per_row: int, context: int,
               page_size: int = 16, cache_dtype=None) -> dict:
    """The engine's two programs for one step, lowered with abstract inputs placed as `Engine`
    places them on `mesh` (the checkpoint layout, as on accelerators): `_forward` over `rows`
    rows of `tokens_per_row` new tokens (1: decode; more: a prefill chunk), each row's page
    table covering `context` tokens, the pool holding `rows` such sequences; then `_sample`.

    Returns `{"forward": Lowered, "sample": Lowered, "parts": {name: abstract tree}}` with the
    parts params, cache (the page pools), inputs and sampler (penalty state), for `k2jax plan`.
    Call inside `sharding.activate(mesh)`.
    """
    pages_per_row = -(-context // page_size)
    num_pages = rows * pages_per_row
    dtype = jnp.dtype(cache_dtype or config.dtype)
    shapes = jax.eval_shape(lambda: paged_cache.init_pages(config, num_pages, page_size, dtype))
    pools = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                        sharding=paged_cache.pool_sharding(mesh)),
                         shapes)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          k2jax.param_shapes(config),
                          param_sharding.param_shardings(config, mesh, serving_layout=False))
    rows_sh = paged_cache.rows_sharding(mesh)

    def row_input(*shape):
        return jax.ShapeDtypeStruct((rows, *shape), jnp.int32, sharding=rows_sh)

    inputs = (row_input(tokens_per_row), row_input(tokens_per_row), row_input(pages_per_row),
              row_input())
    forward = _forward.lower(config, params, pools, *inputs, mesh=mesh, serving_layout=False)
    penalty = tuple(jax.ShapeDtypeStruct((rows, config.vocab_size), dtype, sharding=rows_sh)
                    for dtype in (jnp.bool_, jnp.int32))
    logits = jax.ShapeDtypeStruct((rows, config.vocab_size), jnp.float32, sharding=rows_sh)
    pad_floats, pad_ints = sampling.padding_row()
    steering = sampling.steering_arrays([()] * rows, [None] * rows, config.vocab_size,
                                        lambda n: bucket(n, sampling.INT32_MAX))
    sample = _sample.lower(logits, penalty, np.zeros(rows, np.int32),
                           np.tile(np.asarray(pad_floats, np.float32), (rows, 1)),
                           np.tile(np.asarray(pad_ints, np.int32), (rows, 1)), steering,
                           mesh=mesh)
    return {"forward": forward, "sample": sample,
            "parts": {"params": params, "cache": pools, "inputs": inputs, "sampler": penalty}}


class Engine:
    """Continuous-batching generation for one model.

    Args:
      config, params: the model (the checkpoint's tree; on CPU the engine keeps its own copy in
        the serving layout, `uses_serving_layout`).
      max_batch: slots, the most sequences decoding together.
      max_seq_len: longest prompt + output (default: the smaller of the model's context and
        4096); longer sequences finish with reason "length".
      page_size: tokens per cache page.
      num_pages: pages in the pool (default: enough for every slot at `max_seq_len`); fewer
        pages share memory between slots and preempt when it runs out.
      cache_dtype: storage dtype of the latent cache (default: the model's dtype; bfloat16 or
        float8_e4m3fn to save memory).
      prefill_chunk: most prompt tokens one sequence prefills per step.
      prefix_sharing: share the pages of identical prompt prefixes.
      detokenize: `token_ids -> str`, needed for `text` and stop strings (e.g. a tokenizer's
        `decode`).
      seed: draws the seeds of requests that give none.
      mesh: a `jax.sharding.Mesh` (`k2jax.sharding.make_mesh`) to run on, or None for one
        device. The weights are placed by `k2jax.sharding`'s rules (routed experts split over
        fsdp x expert and run expert-parallel, heads and widths over tensor); the page pool and
        the batch slots are split over every device of the mesh (`paged_cache.pool_axes`), so
        `max_batch` and `num_pages` must divide by `mesh.size`.
    """

    def __init__(self, config: ModelConfig, params, *, max_batch: int = 8,
                 max_seq_len: int | None = None, page_size: int = 16, num_pages: int | None = None,
                 cache_dtype=None, prefill_chunk: int = 256, prefix_sharing: bool = True,
                 detokenize: Detokenize | None = None, seed: int = 0, mesh=None):
        self.config = config
        self.mesh = mesh
        shards = 1 if mesh is None else mesh.size
        if max_batch % shards:
            raise ValueError(f"max_batch={max_batch} does not split over the {shards} devices "
                             f"of mesh {sharding.describe(mesh)}")
        self.serving_layout = uses_serving_layout()
        self.params = _place_params(config, params, mesh, self.serving_layout)
        self.max_batch = max_batch
        if max_seq_len is not None and max_seq_len > config.max_position_embeddings:
            # Positions past the model's context have no trained rotary range: refuse, do not
            # generate quietly degraded text.
            raise ValueError(f"max_seq_len={max_seq_len} is beyond the model's context "
                             f"(max_position_embeddings={config.max_position_embeddings})")
        self.max_seq_len = max_seq_len or min(config.max_position_embeddings, 4096)
        self.page_size = page_size
        self.prefill_chunk = prefill_chunk
        self.detokenize = detokenize
        pages_per_seq = -(-self.max_seq_len // page_size)
        num_pages = num_pages or max_batch * pages_per_seq
        if num_pages % shards:
            raise ValueError(f"num_pages={num_pages} does not split over the {shards} devices "
                             f"of mesh {sharding.describe(mesh)}")
        if num_pages // shards < pages_per_seq:
            per_device = f" ({num_pages // shards} per device)" if shards > 1 else ""
            raise ValueError(f"num_pages={num_pages}{per_device} cannot hold one sequence of "
                             f"max_seq_len={self.max_seq_len} ({pages_per_seq} pages of "
                             f"{page_size})")
        self.max_pages_per_seq = pages_per_seq
        self.cache_dtype = jnp.dtype(cache_dtype or config.dtype)
        self.pools = paged_cache.init_pages(config, num_pages, page_size, self.cache_dtype, mesh)
        self.allocator = PageAllocator(num_pages, page_size, shards)
        self.scheduler = Scheduler(max_batch, self.allocator, prefix_sharing)
        # Per slot: prompt tokens and output-token counts, reset for requests with penalties;
        # on a mesh each device holds the rows of its own slots.
        on = None if mesh is None else paged_cache.rows_sharding(mesh)
        self.penalty = (jnp.zeros((max_batch, config.vocab_size), bool, device=on),
                        jnp.zeros((max_batch, config.vocab_size), jnp.int32, device=on))
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._requests: dict[int, tuple[list[int], list[Sequence]]] = {}
        # Each constrained completion's own `TokenConstraint`, made on its first sampled step.
        self._constraints: dict[Sequence, sampling.TokenConstraint] = {}
        self._failures: dict[int, Exception] = {}
        # On several processes, process 0 (the one that schedules) sends each device call to
        # the others (`serve.multihost`).
        self._broadcast = None
        if jax.process_count() > 1:
            from serve.multihost import StepBroadcast

            self._broadcast = StepBroadcast()
        # Seconds between idle checks that every process is still there (`EngineLoop`).
        self.heartbeat_seconds = 1.0 if self._broadcast is not None else None
        self.stats = dict.fromkeys(
            ("prefill_tokens", "prefix_cached_tokens", "decode_steps", "generated_tokens",
             "preemptions"), 0)

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, prompt_ids, params: SamplingParams | None = None) -> int:
        """Queues a prompt (token ids); returns its request id."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt")
        if not all(0 <= t < self.config.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        if not all(t < self.config.vocab_size for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {self.config.vocab_size})")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in max_seq_len="
                             f"{self.max_seq_len}")
        if params.stop and self.detokenize is None:
            raise ValueError("stop strings need a detokenizer (Engine(detokenize=...))")
        request_id = next(self._ids)
        base_seed = params.seed if params.seed is not None else int(self._rng.integers(2**31))
        stop_ids = frozenset({self.config.eos_token_id, *params.stop_token_ids})
        seqs = [Sequence(request_id, i, prompt, params, (base_seed + i) % 2**31, stop_ids,
                         next(self._arrivals)) for i in range(params.n)]
        self._requests[request_id] = (prompt, seqs)
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def is_finished(self, request_id: int) -> bool:
        return all(s.finish_reason is not None for s in self._requests[request_id][1])

    def pop_result(self, request_id: int) -> GenerationResult:
        """The finished request's result (forgotten by the engine afterwards)."""
        prompt, seqs = self._requests.pop(request_id)
        for seq in seqs:
            self._constraints.pop(seq, None)
        outputs = [Completion(s.index, list(s.generated), s.text, s.finish_reason,
                              s.logprobs if s.params.logprobs is not None else None,
                              s.top_logprobs if s.params.logprobs else None) for s in seqs]
        return GenerationResult(request_id, prompt, outputs)

    def pop_failures(self) -> dict[int, Exception]:
        """Requests that failed since the last call, `{request_id: exception}`; the engine has
        already dropped them (as `abort` does)."""
        failures, self._failures = self._failures, {}
        return failures

    def abort(self, request_id: int) -> None:
        """Drops a request (e.g. its client went away): its sequences leave the queue or free
        their slots and pages, and the engine forgets it. Unknown ids are ignored."""
        _, seqs = self._requests.pop(request_id, (None, []))
        for seq in seqs:
            self._constraints.pop(seq, None)
            if seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)
            self.scheduler.release(seq)
            seq.finish_reason = seq.finish_reason or "abort"

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> list[StreamDelta]:
        """Admit, prefill, decode once, retire. Returns what each completion produced."""
        for seq in self.scheduler.admit():
            self.stats["prefix_cached_tokens"] += seq.num_cached  # found in shared pages
            if seq.params.uses_penalties:
                self._isolated(seq, self._init_penalty_row, seq)
        touched = self._prefill()
        ready = [s for s in self.scheduler.running if s.ready_for_decode]
        self.stats["preemptions"] += len(self.scheduler.reserve_decode_pages(ready))
        touched += self._decode([s for s in ready if s.slot is not None])
        deltas = []
        for seq in dict.fromkeys(touched):
            if self._failed(seq):
                continue
            if seq.finish_reason is not None:
                self.scheduler.release(seq)
            delta = self._isolated(seq, self._delta, seq)
            if delta is not None:
                deltas.append(delta)
        return deltas

    def _failed(self, seq: Sequence) -> bool:
        return seq.request_id in self._failures

    def _isolated(self, seq: Sequence, work, *args):
        """`work(*args)` for `seq`'s request; if it raises, that request fails (and None is
        returned) while the rest of the batch goes on."""
        if self._failed(seq):
            return None
        try:
            return work(*args)
        except Exception as error:  # noqa: BLE001 - any error is this request's alone
            self._failures[seq.request_id] = error
            self.abort(seq.request_id)
            return None

    def _prefill(self) -> list[Sequence]:
        """One call for every sequence with prompt left to cache, a chunk each; samples the
        first token of those whose prompt it completes."""
        seqs = [s for s in self.scheduler.running if s.needs_prefill and not self._failed(s)]
        if not seqs:
            return []
        todo = {s: min(len(s.cache_tokens) - s.num_cached, self.prefill_chunk) for s in seqs}
        row_seqs = self._row_layout([[s for s in seqs if self.scheduler.shard_of(s) == k]
                                     for k in range(self.allocator.num_shards)])
        rows = len(row_seqs)
        length = bucket(max(todo.values()), self.prefill_chunk, MIN_PREFILL_BUCKET)
        tokens = np.zeros((rows, length), np.int32)
        positions = np.full((rows, length), -1, np.int32)
        last = np.zeros(rows, np.int32)
        samplers = []
        for r, seq in enumerate(row_seqs):
            if seq is None:
                continue
            n = todo[seq]
            start, end = seq.num_cached, seq.num_cached + n
            tokens[r, :n] = seq.cache_tokens[start:end]
            positions[r, :n] = np.arange(start, end)
            last[r] = n - 1
            seq.num_cached = end
            if end == len(seq.cache_tokens) and not seq.generated:
                samplers.append((r, seq))
        self.stats["prefill_tokens"] += sum(todo.values())
        out, samplers = self._run(row_seqs, tokens, positions, last, dict(samplers))
        if self.scheduler.prefix_sharing:
            for seq in seqs:  # the prompt pages written so far, shareable from now on
                if not self._failed(seq):
                    self.allocator.register_prefix(seq.prompt[:seq.num_cached], seq.pages)
        return self._record(out, samplers)

    def _decode(self, ready: list[Sequence]) -> list[Sequence]:
        if not ready:
            return []
        per_shard = self.scheduler.slots_per_shard
        by_slot = {seq.slot: seq for seq in ready}
        groups = []
        for start in range(0, self.max_batch, per_shard):
            used = [s - start + 1 for s in by_slot if start <= s < start + per_shard]
            groups.append([by_slot.get(s) for s in range(start, start + max(used, default=0))])
        row_seqs = self._row_layout(groups)
        rows = len(row_seqs)
        tokens = np.zeros((rows, 1), np.int32)
        positions = np.full((rows, 1), -1, np.int32)
        by_row = {}
        for r, seq in enumerate(row_seqs):
            if seq is not None:
                tokens[r, 0] = seq.generated[-1]
                positions[r, 0] = seq.num_cached
                by_row[r] = seq
        out, samplers = self._run(row_seqs, tokens, positions, np.zeros(rows, np.int32),
                                  by_row)
        for seq in ready:
            seq.num_cached += 1
        self.stats["decode_steps"] += 1
        return self._record(out, samplers)

    def _row_layout(self, groups: list[list[Sequence | None]]) -> list[Sequence | None]:
        """The rows of one step from each pool shard's sequences (`groups[k]`, None for a gap):
        one block per shard, block k on the device holding shard k's pages, every block padded
        to the same power of two (one compile per bucket)."""
        per_shard = bucket(max(len(g) for g in groups), self.scheduler.slots_per_shard)
        return [seq for g in groups for seq in g + [None] * (per_shard - len(g))]

    def _on_mesh(self):
        """Where the step functions trace: the engine's mesh and rules (expert-parallel MoE)."""
        return contextlib.nullcontext() if self.mesh is None else sharding.activate(self.mesh)

    def _run(self, row_seqs, tokens, positions, last, samplers: dict[int, Sequence]):
        """One forward and sample; `row_seqs[r]` owns row r (None: padding),
        `samplers` the rows whose sample is kept. Returns the samples and the `(row, seq)`
        pairs still sampled: a request whose sampling row fails is dropped, its rows padding."""
        rows = tokens.shape[0]
        pad_floats, pad_ints = sampling.padding_row()
        floats = np.tile(np.asarray(pad_floats, np.float32), (rows, 1))
        ints = np.tile(np.asarray(pad_ints, np.int32), (rows, 1))
        biases, masks = [()] * rows, [None] * rows
        for r, seq in samplers.items():
            values = self._isolated(seq, self._sampling_row, seq)
            if values is not None:
                floats[r], ints[r], biases[r], masks[r] = values
        steering = sampling.steering_arrays(
            biases, masks, self.config.vocab_size,
            lambda n: bucket(n, sampling.INT32_MAX))
        samplers = {r: seq for r, seq in samplers.items() if not self._failed(seq)}
        row_seqs = [None if seq is None or self._failed(seq) else seq for seq in row_seqs]
        positions[[r for r, seq in enumerate(row_seqs) if seq is None]] = -1
        width = bucket(max((len(s.pages) for s in row_seqs if s is not None), default=1),
                       self.max_pages_per_seq, -(-MIN_CONTEXT_BUCKET // self.page_size))
        # Page ids local to each row's shard; one past the shard's pages is unallocated.
        table = np.full((rows, width), self.allocator.pages_per_shard, np.int32)
        per_shard = self.scheduler.slots_per_shard
        slots = np.full(rows, per_shard, np.int32)
        for r, seq in enumerate(row_seqs):
            if seq is not None:
                table[r, :len(seq.pages)] = self.allocator.local(seq.pages)
        for r, seq in samplers.items():
            slots[r] = seq.slot % per_shard
        out = self._device_call("step", [tokens, positions, table, last, slots, floats, ints,
                                         *steering])
        return out, sorted(samplers.items())

    # ---- device calls (broadcast to every process when serving on several) ------------------
    def release_followers(self) -> None:
        """On several processes, ends the others' `serve.multihost.follow` loops."""
        if self._broadcast is not None:
            from serve.multihost import STOP

            self._broadcast.send(STOP)
            self._broadcast = None

    def heartbeat(self) -> None:
        """An empty call through every process: raises if one of them is gone."""
        if self._broadcast is not None:
            self._device_call("noop", [])

    def _device_call(self, op: str, arrays: list):
        if self._broadcast is not None:
            self._broadcast.send(op, arrays)
        return self.execute(op, arrays)

    def execute(self, op: str, arrays: list):
        """Runs one device call from its host inputs: "step" (forward and sample; returns the
        samples) or "penalty_row". Process 0 makes these through `_device_call`; the others
        receive them (`serve.multihost.follow`)."""
        if op == "noop":
            return None
        if op == "penalty_row":
            slot, prompt_mask, counts = arrays
            self.penalty = _set_penalty_row(self.penalty, slot, prompt_mask, counts)
            return None
        if op != "step":
            raise ValueError(f"unknown engine call {op!r}")
        tokens, positions, table, last, slots, floats, ints, *steering = arrays
        steering = sampling.Steering(*steering)
        inputs = (tokens, positions, table, last)
        if self.mesh is not None:
            inputs = jax.device_put(inputs, paged_cache.rows_sharding(self.mesh))
        with self._on_mesh():
            logits, self.pools = _forward(self.config, self.params, self.pools, *inputs,
                                          mesh=self.mesh, serving_layout=self.serving_layout)
            out, self.penalty = _sample(logits, self.penalty, slots, floats, ints, steering,
                                        mesh=self.mesh)
        if jax.process_count() > 1:  # each process holds its devices' rows: gather them all
            from jax.experimental import multihost_utils

            return jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True))
        return jax.device_get(out)

    def _sampling_row(self, seq: Sequence):
        """`(floats, ints, logit_bias, mask)` of the row that samples `seq`'s next token."""
        floats, ints = sampling.row_values(seq.params, seq.seed, len(seq.generated))
        mask = None
        if seq.params.constraint is not None:
            if seq not in self._constraints:
                self._constraints[seq] = seq.params.constraint()
            mask = self._constraints[seq].next_mask(seq.generated)
            if mask is not None and mask.bitmask is None and not mask.deny and not mask.ids:
                raise ValueError("the request's constraint allows no next token")
        return floats, ints, seq.params.logit_bias, mask

    def _record(self, out, samplers) -> list[Sequence]:
        for r, seq in samplers:
            top = None
            if seq.params.logprobs:
                top = dict(zip(out.top_ids[r].tolist(), out.top_logprobs[r].tolist()))
            self._isolated(seq, seq.append, int(out.tokens[r]), float(out.logprobs[r]), top,
                           self.detokenize, self.max_seq_len)
            self.stats["generated_tokens"] += 1
        return [seq for _, seq in samplers if not self._failed(seq)]

    def _init_penalty_row(self, seq: Sequence) -> None:
        vocab = self.config.vocab_size
        prompt_mask = np.zeros(vocab, bool)
        prompt_mask[seq.prompt] = True
        counts = np.bincount(np.asarray(seq.generated, np.int64), minlength=vocab)
        self._device_call("penalty_row", [np.asarray(seq.slot, np.int32), prompt_mask,
                                          counts.astype(np.int32)])

    def _delta(self, seq: Sequence) -> StreamDelta:
        new = seq.generated[seq.sent_tokens:]
        logprobs = (seq.logprobs[seq.sent_tokens:] if seq.params.logprobs is not None else None)
        top = seq.top_logprobs[seq.sent_tokens:] if seq.params.logprobs else None
        seq.sent_tokens = len(seq.generated)
        return StreamDelta(seq.request_id, seq.index, new, logprobs, seq.text_delta(),
                           seq.finish_reason, top)
