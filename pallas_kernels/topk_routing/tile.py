"""Routing of one token tile, written with ops that both Triton and Mosaic TPU lower.

Neither backend has `top_k` or `sort`, so selection is k passes of: row max -> lowest column
holding it -> mark taken. That is exactly `lax.top_k` on the real columns, ties to the lowest
index, as long as the padding columns (bias -inf) come after them. The group limit is the same
idea one level up: a group's score (sum of its two best) is broadcast over its columns, and the
lowest column holding the best score names the lowest best group.

The combine weights are the unbiased sigmoid scores of the chosen columns, normalised by their
sum taken left to right in selection order (as `reference.py`), so the results are identical.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _first_max(values, candidates, columns, width):
    """Row max of `values` over `candidates` and the lowest column holding it: `[T, 1]` each."""
    masked = jnp.where(candidates, values, -jnp.inf)
    best = jnp.max(masked, axis=1, keepdims=True)
    first = jnp.min(jnp.where(candidates & (masked == best), columns, width), axis=1,
                    keepdims=True)
    return best, first


def _group_mask(choice, columns, *, num_experts, n_group, topk_group):
    """Columns of the `topk_group` best groups, a group scored by its two best choices."""
    width = choice.shape[1]
    per_group = num_experts // n_group
    # lax.div: `//` on integers lowers through `sign`, which makes Mosaic ask for the chip.
    group_of = jax.lax.div(columns, per_group)  # padding columns fall past the last group
    group_score = jnp.full(choice.shape, -jnp.inf, jnp.float32)
    for g in range(n_group):
        in_group = group_of == g
        best, first = _first_max(choice, in_group, columns, width)
        second, _ = _first_max(choice, in_group & (columns != first), columns, width)
        group_score = jnp.where(in_group, best + second, group_score)
    keep = jnp.zeros(choice.shape, jnp.bool_)
    for _ in range(topk_group):
        _, first = _first_max(group_score, ~keep, columns, width)
        keep = keep | (group_of == jax.lax.div(first, per_group))
    return keep


def route_tile(logits_te, bias_1e, *, num_experts: int, top_k: int, n_group: int,
               topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float,
               k_width: int):
    """Routes a tile of tokens.

    Args:
      logits_te: router logits `[T, Ep]`, Ep >= E padded columns (any finite value).
      bias_1e: float32 `[1, Ep]`, -inf on the padding columns.
      k_width: width of the outputs, >= top_k (Triton blocks are powers of two).
    Returns:
      weights float32 `[T, k_width]`, indices int32 `[T, k_width]`, columns past top_k zero.
    """
    width = logits_te.shape[1]
    scores = jax.nn.sigmoid(logits_te.astype(jnp.float32))
    choice = scores + bias_1e
    columns = jnp.arange(width, dtype=jnp.int32)[None, :]
    if n_group > 1:
        keep = _group_mask(choice, columns, num_experts=num_experts, n_group=n_group,
                           topk_group=topk_group)
        choice = jnp.where(keep, choice, -jnp.inf)

    slots = jnp.arange(k_width, dtype=jnp.int32)[None, :]
    taken = jnp.zeros(choice.shape, jnp.bool_)
    weights = jnp.zeros((choice.shape[0], k_width), jnp.float32)
    indices = jnp.zeros((choice.shape[0], k_width), jnp.int32)
    total = jnp.zeros((choice.shape[0], 1), jnp.float32)
    for slot in range(top_k):
        _, first = _first_max(choice, ~taken, columns, width)
        hit = columns == first
        # Exactly one column is hit, so this sum is that column's score, unrounded.
        weight = jnp.sum(jnp.where(hit, scores, 0.0), axis=1, keepdims=True)
        weights = jnp.where(slots == slot, weight, weights)
        indices = jnp.where(slots == slot, first, indices)
        total = total + weight
        taken = taken | hit
    if norm_topk_prob:
        weights = weights / (total + 1e-20)
    return weights * routed_scaling_factor, indices


def kernel(logits_ref, bias_ref, weights_ref, indices_ref, **params):
    """Pallas body shared by both backends: `route_tile` from refs to refs."""
    weights, indices = route_tile(logits_ref[...], bias_ref[...], **params)
    weights_ref[...] = weights
    indices_ref[...] = indices


def prologue(router_logits_te, bias_e, width: int, *, top_k: int, **params):
    """What both backends' wrappers start with: float32 logits `[T, width]` (padding 0), bias
    `[1, width]` (padding -inf), the Pallas body bound to the routing parameters, and the
    outputs' width `k_width` (top_k up to a power of two)."""
    num_experts = router_logits_te.shape[1]
    pad = width - num_experts
    logits = jnp.pad(router_logits_te.astype(jnp.float32), ((0, 0), (0, pad)))
    bias = jnp.pad(bias_e.astype(jnp.float32), (0, pad), constant_values=-jnp.inf)
    k_width = pl.next_power_of_2(top_k)
    body = functools.partial(kernel, num_experts=num_experts, top_k=top_k, k_width=k_width,
                             **params)
    return logits, bias[None, :], body, k_width
