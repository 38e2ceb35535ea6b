"""Grouped INT4 matmul as a Mosaic TPU Pallas kernel (megablox-style).

Grid `(N/bn, W, K/bk)` over the work list of `tiling.py`, prefetched to SMEM so the block index
maps can read it: step `(j, w, k)` DMAs row tile `tile_ids[w]` of x and expert `group_ids[w]`'s
int4 tile `[bk, bn]` with its scales, dequantizes in VMEM and accumulates in a float32 scratch.
At the last K step the item's own rows are merged into the output block. Consecutive items on
the same row tile map to the same output block, which stays in VMEM until the tile changes, so
a tile straddling group boundaries is assembled from one visit per group before it is written.

Items that multiply nothing (the tail group's, and the padding) skip the matmul and map their
weight blocks to one fixed block, so they cost no weight DMA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import check_tiles, dequantize, fitting_tile, int4_dims
from pallas_kernels.grouped_matmul import tiling

_LANES = 128


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes: `block_m` a multiple of 16 (or M), `block_n` of 128 (or N), `block_k` of
    16 groups (or K)."""

    block_m: int
    block_n: int
    block_k: int


def default_config(m: int, k: int, n: int, num_experts: int, group: int = 32) -> Config:
    """Row tiles sized to the mean rows per expert; wide weight tiles when rows are few."""
    rows_per_expert = pl.cdiv(m, num_experts)
    block_m = min(256, max(16, pl.next_power_of_2(rows_per_expert)))
    block_n = fitting_tile(n, 1024 if block_m <= 64 else 512, _LANES)
    return Config(min(block_m, m), block_n, fitting_tile(k, 512, 16 * group))


def _kernel(group_ids_ref, tile_ids_ref, num_items_ref, starts_ref, ends_ref,
            x_ref, values_ref, scale_ref, out_ref, acc_ref, *, num_experts: int):
    """Refs `x [bm, bk]`, `values [bk, bn]`, `scale [bk/g, bn]`, `out [bm, bn]`, `acc` f32."""
    item, k_step = pl.program_id(1), pl.program_id(2)
    g = group_ids_ref[item]
    real = item < num_items_ref[0]

    @pl.when(k_step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(real & (g < num_experts))
    def _accumulate():
        x = x_ref[...]
        w = dequantize(values_ref[...], scale_ref[...], x.dtype)
        acc_ref[...] += jnp.dot(x, w, preferred_element_type=jnp.float32)

    @pl.when(real & (k_step == pl.num_programs(2) - 1))
    def _merge():
        bm = out_ref.shape[0]
        rows = tile_ids_ref[item] * bm + jax.lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
        mine = (rows >= starts_ref[g]) & (rows < ends_ref[g])
        out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), out_ref[...])


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def grouped_int4_matmul(x_mk: jax.Array, values_ekn: jax.Array, scale_egn: jax.Array,
                        group_sizes_e: jax.Array, *, config: Config | None = None,
                        interpret: bool = False) -> jax.Array:
    """Rows of `x [M, K]` sorted by expert (`group_sizes [E]`, sum <= M) times `values int4
    [E, K, N] * scale [E, K/g, N]` -> `[M, N]` in x's dtype, zeros past the sum."""
    m, k, n, group = int4_dims(x_mk, values_ekn, scale_egn)
    num_experts = values_ekn.shape[0]
    cfg = config or default_config(m, k, n, num_experts, group)
    check_tiles(cfg, k, n, group)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    work = tiling.work_list(group_sizes_e, m, bm)
    last_k = k // bk - 1

    def computing(w, group_ids, num_items):
        return (w < num_items[0]) & (group_ids[w] < num_experts)

    def weight_block(j, w, kk, group_ids, tile_ids, num_items, starts, ends):
        del tile_ids, starts, ends
        computes = computing(w, group_ids, num_items)
        expert = jnp.where(computes, group_ids[w], num_experts - 1)
        return expert, jnp.where(computes, kk, last_k), j

    def x_block(j, w, kk, group_ids, tile_ids, num_items, starts, ends):
        del j, starts, ends
        return tile_ids[w], jnp.where(computing(w, group_ids, num_items), kk, last_k)

    def out_block(j, w, kk, group_ids, tile_ids, *_):
        del kk, group_ids
        return tile_ids[w], j

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(n // bn, work.group_ids.shape[0], k // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), x_block),
            pl.BlockSpec((pl.squeezed, bk, bn), weight_block),
            pl.BlockSpec((pl.squeezed, bk // group, bn), weight_block),
        ],
        out_specs=pl.BlockSpec((bm, bn), out_block),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_kernel, num_experts=num_experts),
        out_shape=jax.ShapeDtypeStruct((m, n), x_mk.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="grouped_int4_matmul",
    )(work.group_ids, work.tile_ids, work.num_items, work.group_starts, work.group_ends,
      x_mk, values_ekn, scale_egn)
