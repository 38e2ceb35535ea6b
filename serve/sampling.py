"""Sampling parameters (named as in vLLM's `SamplingParams` and HF `generate()`) and the jitted
next-token sampler.

The sampler works on a batch of rows `[B, V]` where every row carries its own parameters, so
requests with different settings decode together. Per row, in vLLM's order:

  logit bias  the request's `logit_bias`, added to the logits (sparse: `[B, K]` ids and values)
  mask        the request's constraint for this step (`TokenMask`): an allow list or a deny
              list of ids `[B, K]`, or a dense bitmask `[B, ceil(V/32)]`; masked tokens -inf
  penalties   repetition (prompt and output tokens, HF/vLLM rule: divide positive logits,
              multiply negative ones), presence and frequency (output tokens, OpenAI rule)
  greedy      temperature 0: argmax of the penalised logits
  temperature logits / temperature
  top-k       keep the k largest (ties at the k-th value kept)
  top-p       keep the smallest prefix of the sorted distribution whose mass reaches p
  min-p       drop tokens whose probability is below min_p x the largest probability
  draw        argmax(logits + Gumbel noise): a categorical draw

Randomness comes from `fold_in(key(seed), step)`, the request's own seed and the number of
tokens it has generated so far, never its batch row: a seeded request produces the same tokens
whatever else shares its batch. The noise is drawn in vocabulary order, so whether a filter ran
for some other row cannot change a row's draw.

Reported logprobs are those of the model's distribution, `log_softmax(logits)`, before
bias, masks, penalties, temperature and filters (vLLM's default "raw" logprobs).

A constraint (`SamplingParams.constraint`) is host-side: a factory of one `TokenConstraint` per
completion, asked before each step for the tokens allowed next given those generated so far.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_TOP_LOGPROBS = 20  # as vLLM's default max_logprobs
INT32_MAX = 2**31 - 1  # integer parameters travel to the sampler in int32 arrays
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
LOGIT_BIAS_RANGE = 100.0

# How a row's `TokenMask` reads (the sampler's `mask_mode` column).
MASK_FREE, MASK_ALLOW, MASK_DENY, MASK_BITMASK = 0, 1, 2, 3


class TokenMask(NamedTuple):
    """The tokens a constraint allows next: `ids` only (`deny=False`), every token but `ids`
    (`deny=True`), or, when `bitmask` is given, those whose bit is set (uint32 words as int32,
    `[ceil(V/32)]`, token t at bit t % 32 of word t // 32: llguidance's layout)."""

    ids: tuple[int, ...] = ()
    deny: bool = False
    bitmask: np.ndarray | None = None

    @property
    def mode(self) -> int:
        if self.bitmask is not None:
            return MASK_BITMASK
        return MASK_DENY if self.deny else MASK_ALLOW


class TokenConstraint(Protocol):
    """One completion's constraint: `next_mask(generated)` gives the mask for the next token,
    or None when any token may follow. Called once per step with every token generated so far
    (the list only grows, preemption included), so implementations may advance incrementally."""

    def next_mask(self, generated: Sequence[int]) -> TokenMask | None: ...

_ALIASES = {"max_tokens": "max_new_tokens"}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. `temperature=0` is greedy; `top_k` 0 or -1 disables top-k.

    `n` completions are drawn per prompt; with a `seed`, completion i uses seed + i.
    `logprobs=None` returns none, `0` the chosen tokens' logprobs, `N` also the top N per step.
    `stop` strings need a detokenizer (the engine's `detokenize`); the text is cut before them.
    `logit_bias` maps token ids to values in [-100, 100] added to their logits (a mapping or
    `(id, bias)` pairs, at most 300). `constraint` is called once per completion and returns its
    `TokenConstraint` (e.g. `serve.constraints`), asked before every step.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    constraint: Callable[[], TokenConstraint] | None = None

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        bias = self.logit_bias or ()
        bias = bias.items() if isinstance(bias, dict) else bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        need(isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= INT32_MAX,
             f"max_new_tokens must be an integer in [1, 2**31), got {self.max_new_tokens!r}")
        need(self.temperature >= 0 and math.isfinite(self.temperature),
             f"temperature must be >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(isinstance(self.top_k, int) and -1 <= self.top_k <= INT32_MAX,
             f"top_k must be an integer in [-1, 2**31) (0 or -1 disable it), got {self.top_k!r}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
             f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        need(isinstance(self.n, int) and self.n >= 1,
             f"n must be a positive integer, got {self.n!r}")
        need(all(0 <= t <= INT32_MAX for t in self.stop_token_ids),
             f"stop_token_ids must be in [0, 2**31), got {self.stop_token_ids!r}")
        need(all(isinstance(s, str) and s for s in self.stop),
             f"stop must be non-empty strings, got {self.stop!r}")
        need(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**31),
             f"seed must be an integer in [0, 2**31), got {self.seed!r}")
        need(self.logprobs is None or (isinstance(self.logprobs, int)
                                       and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
             f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], "
             f"got {self.logprobs!r}")
        need(len(self.logit_bias) <= MAX_LOGIT_BIAS,
             f"logit_bias has at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        need(len({t for t, _ in self.logit_bias}) == len(self.logit_bias),
             "logit_bias names a token id twice")
        need(all(0 <= t <= INT32_MAX and -LOGIT_BIAS_RANGE <= b <= LOGIT_BIAS_RANGE
                 for t, b in self.logit_bias),
             f"logit_bias: ids must be in [0, 2**31) and biases in [-100, 100], "
             f"got {self.logit_bias[:4]!r}...")
        need(self.constraint is None or callable(self.constraint),
             "constraint must be a callable returning a TokenConstraint")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "SamplingParams":
        """Builds from user keyword arguments; `max_tokens` is accepted for `max_new_tokens`.

        An unknown name raises: a parameter is never silently ignored.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {}
        for name, value in kwargs.items():
            field = _ALIASES.get(name, name)
            if field not in known:
                raise ValueError(f"unsupported sampling parameter {name!r}; supported: "
                                 f"{', '.join(sorted(known | set(_ALIASES)))}")
            if field in fields and fields[field] != value:
                raise ValueError(f"{name!r} and {field!r} given with different values")
            fields[field] = value
        return cls(**fields)

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)


# Columns of the per-row parameter arrays the host sends with each step.
FLOAT_COLUMNS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")
INT_COLUMNS = ("top_k", "seed", "step", "top_logprobs")


def row_values(params: SamplingParams, seed: int, step: int) -> tuple[list[float], list[int]]:
    """One row of the float and int parameter arrays (`FLOAT_COLUMNS`, `INT_COLUMNS`)."""
    floats = [getattr(params, name) for name in FLOAT_COLUMNS]
    return floats, [max(params.top_k, 0), seed, step, params.logprobs or 0]


def padding_row() -> tuple[list[float], list[int]]:
    """Parameters of a row whose sample is discarded: greedy, nothing to compute."""
    return row_values(SamplingParams(temperature=0.0), 0, 0)


class Steering(NamedTuple):
    """Per-row logit bias and masks, sparse so that no `[B, V]` array crosses to the device
    (except the bitmask, sent only when some row of the step needs one).

    bias_ids, bias_values: int32 / float32 `[B, K]`; padding ids are V (dropped).
    mask_ids: int32 `[B, M]`, the ids of an allow or deny list (padding V); mask_mode: int32
      `[B]`, `MASK_*`; bitmask: int32 `[B, ceil(V/32)]` or None.
    """

    bias_ids: Any
    bias_values: Any
    mask_ids: Any
    mask_mode: Any
    bitmask: Any = None


def steering_arrays(biases: list, masks: list, vocab: int, bucket) -> Steering:
    """`Steering` for `B` rows from each row's `logit_bias` pairs and `TokenMask` (or None);
    widths are rounded by `bucket(n)` so that a few shapes serve every request."""
    rows = len(biases)
    k = bucket(max((len(b) for b in biases), default=0))
    bias_ids = np.full((rows, k), vocab, np.int32)
    bias_values = np.zeros((rows, k), np.float32)
    for r, pairs in enumerate(biases):
        for j, (token, value) in enumerate(pairs):
            bias_ids[r, j], bias_values[r, j] = token, value
    m = bucket(max((len(mk.ids) for mk in masks if mk is not None and mk.bitmask is None),
                   default=0))
    mask_ids = np.full((rows, m), vocab, np.int32)
    mask_mode = np.zeros(rows, np.int32)
    bitmask = None
    if any(mk is not None and mk.bitmask is not None for mk in masks):
        bitmask = np.zeros((rows, -(-vocab // 32)), np.int32)
    for r, mk in enumerate(masks):
        if mk is None:
            continue
        mask_mode[r] = mk.mode
        if mk.bitmask is not None:
            words = np.asarray(mk.bitmask).view(np.int32).ravel()[:bitmask.shape[1]]
            bitmask[r, :len(words)] = words
        else:
            mask_ids[r, :len(mk.ids)] = mk.ids
    return Steering(bias_ids, bias_values, mask_ids, mask_mode, bitmask)


def apply_steering(logits_bv, steering: Steering):
    """Adds each row's logit bias, then sets the tokens its mask forbids to -inf."""
    rows_b1 = jnp.arange(logits_bv.shape[0])[:, None]
    vocab = logits_bv.shape[-1]
    logits_bv = logits_bv.at[rows_b1, steering.bias_ids].add(steering.bias_values, mode="drop")
    mode_b1 = steering.mask_mode[:, None]

    def masked():
        listed_bv = jnp.zeros(logits_bv.shape, bool).at[rows_b1, steering.mask_ids].set(
            True, mode="drop")
        allowed_bv = jnp.where(mode_b1 == MASK_ALLOW, listed_bv, ~listed_bv)
        if steering.bitmask is not None:
            v = jnp.arange(vocab)
            bits_bv = (steering.bitmask[:, v // 32] >> (v % 32)[None]) & 1
            allowed_bv = jnp.where(mode_b1 == MASK_BITMASK, bits_bv == 1, allowed_bv)
        allowed_bv = allowed_bv | (mode_b1 == MASK_FREE)
        return jnp.where(allowed_bv, logits_bv, -jnp.inf)

    return jax.lax.cond(jnp.any(steering.mask_mode != MASK_FREE), masked, lambda: logits_bv)


class Sampled(NamedTuple):
    """What the sampler returns per row: token `[B]`, its logprob `[B]`, and (when asked) the
    top `MAX_TOP_LOGPROBS` (at most V) ids and logprobs `[B, MAX_TOP_LOGPROBS]` (zeros unless
    some row asked for them)."""

    tokens: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def apply_penalties(logits_bv, row_floats, prompt_mask_bv, counts_bv):
    """Repetition penalty on prompt and output tokens; presence and frequency on output tokens."""
    col = {name: row_floats[:, i, None] for i, name in enumerate(FLOAT_COLUMNS)}
    seen = prompt_mask_bv | (counts_bv > 0)
    rep = col["repetition_penalty"]
    logits_bv = jnp.where(seen, jnp.where(logits_bv > 0, logits_bv / rep, logits_bv * rep),
                          logits_bv)
    return (logits_bv - col["presence_penalty"] * (counts_bv > 0)
            - col["frequency_penalty"] * counts_bv)


def filter_logits(logits_bv, top_k_b, top_p_b, min_p_b):
    """Sets logits outside each row's top-k, top-p and min-p sets to -inf.

    A row with `top_k_b` 0, `top_p_b` 1 and `min_p_b` 0 comes back unchanged.
    """
    vocab = logits_bv.shape[-1]
    neg_inf = jnp.array(-jnp.inf, logits_bv.dtype)
    sorted_bv = -jnp.sort(-logits_bv, axis=-1)
    k_b = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, vocab), vocab)
    kth_b1 = jnp.take_along_axis(sorted_bv, (k_b - 1)[:, None], axis=-1)
    logits_bv = jnp.where(logits_bv < kth_b1, neg_inf, logits_bv)
    # Top-p over the top-k survivors: a sorted token stays while the mass before it is < p.
    rank_v = jnp.arange(vocab)
    sorted_bv = jnp.where(rank_v[None] < k_b[:, None], sorted_bv, neg_inf)
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    keep_bv = (mass_before_bv < top_p_b[:, None]) | (rank_v[None] == 0)
    last_b1 = jnp.sum(keep_bv, axis=-1, keepdims=True) - 1
    cut_b1 = jnp.take_along_axis(sorted_bv, last_b1, axis=-1)
    # top_p == 1 must be an exact no-op, whatever rounding does to the cumulative sum.
    cut_b1 = jnp.where(top_p_b[:, None] >= 1, neg_inf, cut_b1)
    logits_bv = jnp.where(logits_bv < cut_b1, neg_inf, logits_bv)
    probs_bv = jax.nn.softmax(logits_bv, axis=-1)
    floor_b1 = min_p_b[:, None] * jnp.max(probs_bv, axis=-1, keepdims=True)
    return jnp.where(probs_bv < floor_b1, neg_inf, logits_bv)


def row_keys(seeds_b, steps_b):
    """One PRNG key per row from the request's seed and its own step count."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(
        seeds_b.astype(jnp.uint32), steps_b.astype(jnp.uint32))


def sample(logits_bv, row_floats, row_ints, penalty_rows, steering: Steering | None = None):
    """Draws one token per row.

    Work that no row of the batch needs (penalties, random draws, filters, top-N logprobs) is
    skipped at run time by `lax.cond`, so one compiled program serves every mix of requests
    and a row's result never depends on which branches ran for the others.

    Args:
      logits_bv: float32 `[B, V]` next-token logits.
      row_floats: float32 `[B, len(FLOAT_COLUMNS)]` and row_ints: int32
        `[B, len(INT_COLUMNS)]`, the per-row parameters (`row_values`).
      penalty_rows: `() -> (prompt_mask [B, V] bool, counts [B, V] int32)`, the prompt tokens
        and output-token counts of each row (called only when some row uses a penalty).
      steering: each row's logit bias and mask (`Steering`), or None for none.
    Returns:
      `Sampled`.
    """
    logits_bv = logits_bv.astype(jnp.float32)
    logprobs_bv = jax.nn.log_softmax(logits_bv, axis=-1)
    col = {name: row_floats[:, i] for i, name in enumerate(FLOAT_COLUMNS)}
    icol = {name: row_ints[:, i] for i, name in enumerate(INT_COLUMNS)}
    greedy_b = col["temperature"] == 0
    penalised_b = ((col["repetition_penalty"] != 1) | (col["presence_penalty"] != 0)
                   | (col["frequency_penalty"] != 0))
    filtered_b = ~greedy_b & ((icol["top_k"] > 0) | (col["top_p"] < 1) | (col["min_p"] > 0))

    steered_bv = logits_bv if steering is None else apply_steering(logits_bv, steering)
    scores_bv = jax.lax.cond(
        jnp.any(penalised_b),
        lambda: apply_penalties(steered_bv, row_floats, *penalty_rows()),
        lambda: steered_bv)
    argmax_b = jnp.argmax(scores_bv, axis=-1).astype(jnp.int32)

    def draw():
        scaled_bv = scores_bv / jnp.where(greedy_b, 1.0, col["temperature"])[:, None]
        scaled_bv = jax.lax.cond(
            jnp.any(filtered_b),
            lambda: filter_logits(scaled_bv, icol["top_k"], col["top_p"], col["min_p"]),
            lambda: scaled_bv)
        keys = row_keys(icol["seed"], icol["step"])
        gumbel_bv = jax.vmap(lambda k: jax.random.gumbel(k, logits_bv.shape[-1:]))(keys)
        drawn_b = jnp.argmax(scaled_bv + gumbel_bv, axis=-1).astype(jnp.int32)
        return jnp.where(greedy_b, argmax_b, drawn_b)

    tokens_b = jax.lax.cond(jnp.all(greedy_b), lambda: argmax_b, draw)
    chosen_b = jnp.take_along_axis(logprobs_bv, tokens_b[:, None], axis=-1)[:, 0]

    width = (logits_bv.shape[0], min(MAX_TOP_LOGPROBS, logits_bv.shape[-1]))

    def top():
        values, ids = jax.lax.top_k(logprobs_bv, width[1])
        return ids.astype(jnp.int32), values

    top_ids, top_lp = jax.lax.cond(
        jnp.any(icol["top_logprobs"] > 0), top,
        lambda: (jnp.zeros(width, jnp.int32), jnp.zeros(width, jnp.float32)))
    return Sampled(tokens_b, chosen_b, top_ids, top_lp)
