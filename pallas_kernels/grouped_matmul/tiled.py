"""Grouped matmul as a loop over row tiles, each tile one expert's: the XLA:CPU implementation.

`lax.ragged_dot` lowers on XLA:CPU to a dense product of every row with every expert (M x E
matmuls, then a select), so a decode step pays for all E experts however few are routed. Here
the expert-sorted rows are cut into tiles of `tile_rows` rows that never straddle two experts;
a `while_loop` over the tiles actually present multiplies each by its own expert's weight,
read (and for INT4, dequantized) once per tile. Experts with no rows cost nothing, so the
bytes read follow the routed experts, which is what a memory-bound decode step needs.

Differentiable in `x` and in float weights (`custom_vjp`, the backward is the same tile loop);
INT4 `QuantizedWeight`s get gradients for `scale` only, as the kernels' reference.
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import common
from pallas_kernels.common import dequantize
from pallas_kernels.quantized import QuantizedWeight


class TileSchedule(typing.NamedTuple):
    """Which rows each tile covers: tile t multiplies rows `[start_t, end_t)` by expert
    `expert_t`'s weight; only the first `num_tiles` entries are real."""

    num_tiles: jax.Array  # int32 []
    expert_t: jax.Array  # int32 [T_max]
    start_t: jax.Array  # int32 [T_max]
    end_t: jax.Array  # int32 [T_max]


def default_tile_rows(num_rows: int, num_experts: int) -> int:
    """Rows per tile: twice the mean rows per expert, a power of two in [1, 64]. A decode step
    (a row or two per routed expert) then reads each routed expert about once and pads
    little; prefill runs real matmuls."""
    per_expert = -(-2 * num_rows // max(num_experts, 1))
    return min(64, 1 << max(per_expert - 1, 0).bit_length())


def tile_schedule(group_sizes_e: jax.Array, num_rows: int, tile_rows: int) -> TileSchedule:
    """Splits each expert's contiguous rows into tiles of at most `tile_rows` rows."""
    num_experts = group_sizes_e.shape[0]
    # Rows past `num_rows` (sum(group_sizes) > M) are never computed, as in ragged_dot.
    ends_e = jnp.minimum(jnp.cumsum(group_sizes_e), num_rows)
    starts_e = jnp.concatenate([jnp.zeros((1,), ends_e.dtype), ends_e[:-1]])
    tiles_e = -(-(ends_e - starts_e) // tile_rows)
    tile_ends_e = jnp.cumsum(tiles_e)
    # A tile holds at least one row, and only an expert's last tile may be partial.
    max_tiles = max(1, min(num_rows, -(-num_rows // tile_rows) + min(num_experts, num_rows)))
    t = jnp.arange(max_tiles, dtype=jnp.int32)
    expert_t = jnp.minimum(jnp.searchsorted(tile_ends_e, t, side="right"), num_experts - 1)
    first_tile_t = tile_ends_e[expert_t] - tiles_e[expert_t]
    start_t = starts_e[expert_t] + (t - first_tile_t) * tile_rows
    end_t = jnp.minimum(start_t + tile_rows, ends_e[expert_t])
    return TileSchedule(tile_ends_e[-1].astype(jnp.int32), expert_t.astype(jnp.int32),
                        start_t.astype(jnp.int32), end_t.astype(jnp.int32))


def _expert_weight(w, expert, dtype) -> jax.Array:
    """Expert `expert`'s `[K, N]` weight in `dtype` (INT4 dequantized)."""
    if not isinstance(w, QuantizedWeight):
        return jax.lax.dynamic_index_in_dim(w, expert, keepdims=False).astype(dtype)
    values = jax.lax.dynamic_index_in_dim(w.values, expert, keepdims=False)
    scale = jax.lax.dynamic_index_in_dim(w.scale, expert, keepdims=False)
    return dequantize(values, scale, dtype)


def _summed_to_type_of(cotangent, primal):
    """A cotangent summed over the mesh axes it varies over and its primal does not: inside
    `shard_map` a weight replicated over `data` gets the sum of every data shard's gradient
    (what the transpose of the implicit broadcast gives ops without a custom rule)."""
    def match(ct, x):
        if ct.dtype == jax.dtypes.float0:
            return ct
        extra = (set(jax.typeof(ct).manual_axis_type.varying)
                 - set(jax.typeof(x).manual_axis_type.varying))
        return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct

    return jax.tree.map(match, cotangent, primal)


def _tile_loop(schedule: TileSchedule, tile_rows: int, init, body, operands):
    """`init` updated by `body(carry, start, expert, row_mask [tile, 1])` for each real tile,
    in order; `operands` are what the body reads (for the carry's type under shard_map)."""
    init = common.varying_like(init, operands, schedule)

    def step(state):
        t, carry = state
        start, end = schedule.start_t[t], schedule.end_t[t]
        row_mask = (jnp.arange(tile_rows) < end - start)[:, None]
        return t + 1, body(carry, start, schedule.expert_t[t], row_mask)

    _, out = jax.lax.while_loop(lambda s: s[0] < schedule.num_tiles, step,
                                (jnp.int32(0), init))
    return out


def _rows(a_pad, start, tile_rows):
    return jax.lax.dynamic_slice_in_dim(a_pad, start, tile_rows)


def _masked_store(out_pad, tile, start, row_mask):
    """Writes a tile's valid rows; the rows past them belong to the next expert's tile."""
    old = _rows(out_pad, start, tile.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(out_pad, jnp.where(row_mask, tile, old), start,
                                               axis=0)


def _pad_rows(a, tile_rows):
    # A tile starting near the end must not be clamped back into rows of another expert.
    return jnp.pad(a, ((0, tile_rows), (0, 0)))


def _matmul_rows(x_mk, w, schedule, tile_rows, dtype, transpose_w):
    """`x` rows times their expert's weight (or its transpose) -> float32 `[M, N]`."""
    num_rows = x_mk.shape[0]
    n = w.shape[-2] if transpose_w else w.shape[-1]
    x_pad = _pad_rows(x_mk, tile_rows)

    def body(y_pad, start, expert, row_mask):
        w_kn = _expert_weight(w, expert, dtype)
        spec = "tn,kn->tk" if transpose_w else "tk,kn->tn"
        tile = jnp.einsum(spec, _rows(x_pad, start, tile_rows), w_kn,
                          preferred_element_type=jnp.float32)
        return _masked_store(y_pad, tile, start, row_mask)

    y_pad = _tile_loop(schedule, tile_rows, jnp.zeros((num_rows + tile_rows, n), jnp.float32),
                       body, (x_pad, w))
    return y_pad[:num_rows]


def _weight_grad(x_mk, dy_mn, w, schedule, tile_rows):
    """`sum over each expert's rows of x^T dy` -> float32 `[E, K, N]`."""
    x_pad, dy_pad = _pad_rows(x_mk, tile_rows), _pad_rows(dy_mn, tile_rows)

    def body(dw_ekn, start, expert, row_mask):
        x_tile = jnp.where(row_mask, _rows(x_pad, start, tile_rows), 0)
        dw_kn = jnp.einsum("tk,tn->kn", x_tile, _rows(dy_pad, start, tile_rows),
                           preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_index_in_dim(dw_ekn, expert, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(dw_ekn, old + dw_kn, expert, axis=0)

    return _tile_loop(schedule, tile_rows, jnp.zeros(w.shape, jnp.float32), body,
                      (x_pad, dy_pad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped(x_mk, w, group_sizes_e, tile_rows, dtype):
    schedule = tile_schedule(group_sizes_e, x_mk.shape[0], tile_rows)
    return _matmul_rows(x_mk.astype(dtype), w, schedule, tile_rows, dtype,
                        transpose_w=False).astype(dtype)


def _grouped_fwd(x_mk, w, group_sizes_e, tile_rows, dtype):
    return _grouped(x_mk, w, group_sizes_e, tile_rows, dtype), (x_mk, w, group_sizes_e)


def _grouped_bwd(tile_rows, dtype, residuals, dy_mn):
    x_mk, w, group_sizes_e = residuals
    schedule = tile_schedule(group_sizes_e, x_mk.shape[0], tile_rows)
    dy_mn = dy_mn.astype(dtype)
    dx = _matmul_rows(dy_mn, w, schedule, tile_rows, dtype, transpose_w=True).astype(x_mk.dtype)
    dw_ekn = _weight_grad(x_mk.astype(dtype), dy_mn, w, schedule, tile_rows)
    if not isinstance(w, QuantizedWeight):
        dw = dw_ekn.astype(w.dtype)
    else:  # d/d scale of values * scale: the group sums of dW * values
        *lead, k, n = w.values.shape
        groups = w.scale.shape[-2]
        values = w.values.astype(jnp.float32).reshape(*lead, groups, k // groups, n)
        d_scale = (dw_ekn.reshape(values.shape) * values).sum(-2).astype(w.scale.dtype)
        dw = type(w)(np.zeros(w.values.shape, jax.dtypes.float0), d_scale)
    return _summed_to_type_of(dx, x_mk), _summed_to_type_of(dw, w), None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def tiled_grouped_matmul(x_mk: jax.Array, w: jax.Array | QuantizedWeight,
                         group_sizes_e: jax.Array, dtype, tile_rows: int | None = None
                         ) -> jax.Array:
    """Expert-sorted rows `x [M, K]` times per-expert `w [E, K, N]` -> `[M, N]` in `dtype`.

    `w` is an array or an INT4 `QuantizedWeight`; rows past `sum(group_sizes)` give zeros.
    """
    num_rows = x_mk.shape[0]
    tile_rows = tile_rows or default_tile_rows(num_rows, w.shape[0])
    return _grouped(x_mk, w, group_sizes_e.astype(jnp.int32), tile_rows, jnp.dtype(dtype))


def _swiglu_rows(x_mk, gate, up, down, group_sizes_e, tile_rows, dtype):
    """The three grouped matmuls of the expert SwiGLU, each its own tile loop."""
    mm = functools.partial(_grouped, group_sizes_e=group_sizes_e, tile_rows=tile_rows,
                           dtype=dtype)
    return mm(jax.nn.silu(mm(x_mk, gate)) * mm(x_mk, up), down)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _swiglu(x_mk, gate, up, down, group_sizes_e, tile_rows, dtype):
    num_rows = x_mk.shape[0]
    schedule = tile_schedule(group_sizes_e, num_rows, tile_rows)
    x_pad = _pad_rows(x_mk.astype(dtype), tile_rows)

    def body(y_pad, start, expert, row_mask):
        x_tile = _rows(x_pad, start, tile_rows)
        mm = lambda a, w: jnp.einsum("tk,kn->tn", a, _expert_weight(w, expert, dtype),  # noqa: E731
                                     preferred_element_type=jnp.float32).astype(dtype)
        h = jax.nn.silu(mm(x_tile, gate)) * mm(x_tile, up)
        return _masked_store(y_pad, mm(h, down), start, row_mask)

    init = jnp.zeros((num_rows + tile_rows, down.shape[-1]), dtype)
    return _tile_loop(schedule, tile_rows, init, body, (x_pad, gate, up, down))[:num_rows]


def _swiglu_fwd(x_mk, gate, up, down, group_sizes_e, tile_rows, dtype):
    out = _swiglu(x_mk, gate, up, down, group_sizes_e, tile_rows, dtype)
    return out, (x_mk, gate, up, down, group_sizes_e)


def _swiglu_bwd(tile_rows, dtype, residuals, dy_mn):
    # The backward recomputes the hidden activations through the unfused loops (as remat would).
    x_mk, gate, up, down, group_sizes_e = residuals
    _, vjp = jax.vjp(
        lambda x, g, u, d: _swiglu_rows(x, g, u, d, group_sizes_e, tile_rows, dtype),
        x_mk, gate, up, down)
    return (*_summed_to_type_of(vjp(dy_mn), (x_mk, gate, up, down)), None)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def tiled_expert_swiglu(x_mk: jax.Array, gate, up, down, group_sizes_e: jax.Array, dtype,
                        tile_rows: int | None = None) -> jax.Array:
    """Expert-sorted rows `x [M, D]` through their experts' SwiGLU
    `down(silu(x @ gate) * (x @ up))` -> `[M, D]`, one tile loop for all three matmuls.

    Kernels `[E, D, F]`, `[E, D, F]`, `[E, F, D]`, arrays or INT4 `QuantizedWeight`s.
    """
    tile_rows = tile_rows or default_tile_rows(x_mk.shape[0], gate.shape[0])
    return _swiglu(x_mk, gate, up, down, group_sizes_e.astype(jnp.int32), tile_rows,
                   jnp.dtype(dtype))
