"""Grouped INT4 matmul as a Triton-lowered Pallas kernel (GPU).

Grid `(W, N/bn)` over the work list of `tiling.py`: program `(w, j)` takes row tile
`tile_ids[w]` and expert `group_ids[w]`, loads only that expert's rows of the tile (others
masked to zero), walks K in a `fori_loop` dequantizing `[bk, bn]` int4 tiles in registers, and
stores only its expert's rows. Tail-group items store zeros without touching weights; padding
items return at once. Triton has no scalar prefetch, so the work list is read from global memory
and every ref is indexed by hand.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import check_tiles, dequantize, int4_dims, largest_pow2_divisor
from pallas_kernels.grouped_matmul import tiling


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes, all powers of two (`block_m` >= 16 for `tl.dot`); `block_k` a multiple of
    the quantization group."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def default_config(m: int, k: int, n: int, num_experts: int) -> Config:
    """Row tiles sized to the mean rows per expert; decode-like loads (few rows per expert)
    take narrow, deep weight tiles, prefill-like loads square ones."""
    rows_per_expert = pl.cdiv(m, num_experts)
    block_m = min(128, max(16, pl.next_power_of_2(rows_per_expert)))
    if block_m <= 32:
        return Config(block_m, largest_pow2_divisor(n, 64), largest_pow2_divisor(k, 256),
                      num_warps=4, num_stages=4)
    return Config(block_m, largest_pow2_divisor(n, 128), largest_pow2_divisor(k, 64),
                  num_warps=4 if block_m == 64 else 8, num_stages=3)


def _kernel(group_ids_ref, tile_ids_ref, num_items_ref, starts_ref, ends_ref,
            x_ref, values_ref, scale_ref, out_ref, *, cfg: Config, group: int):
    """Whole refs: `x [M, K]`, `values [E, K, N]`, `scale [E, K/g, N]`, `out [M, N]`."""
    item, col_block = pl.program_id(0), pl.program_id(1)
    num_experts, k, _ = values_ref.shape
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    groups_per_block = bk // group

    @pl.when(item < num_items_ref[0])
    def _work():
        g = group_ids_ref[item]
        row0 = tile_ids_ref[item] * bm
        rows = row0 + jnp.arange(bm)
        mine = (rows >= starts_ref[g]) & (rows < ends_ref[g])
        expert = jnp.minimum(g, num_experts - 1)
        cols = pl.ds(col_block * bn, bn)

        def step(i, acc):
            x = plgpu.load(x_ref.at[pl.ds(row0, bm), pl.ds(i * bk, bk)],
                           mask=jnp.broadcast_to(mine[:, None], (bm, bk)), other=0)
            values = values_ref[expert, pl.ds(i * bk, bk), cols]
            scale = scale_ref[expert, pl.ds(i * groups_per_block, groups_per_block), cols]
            w = dequantize(values, scale, x.dtype)
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

        # The tail group (g == E) runs no K steps and so stores zeros.
        num_steps = jnp.where(g < num_experts, k // bk, 0)
        acc = jax.lax.fori_loop(0, num_steps, step, jnp.zeros((bm, bn), jnp.float32))
        plgpu.store(out_ref.at[pl.ds(row0, bm), cols], acc.astype(out_ref.dtype),
                    mask=jnp.broadcast_to(mine[:, None], (bm, bn)))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def grouped_int4_matmul(x_mk: jax.Array, values_ekn: jax.Array, scale_egn: jax.Array,
                        group_sizes_e: jax.Array, *, config: Config | None = None,
                        interpret: bool = False) -> jax.Array:
    """Rows of `x [M, K]` sorted by expert (`group_sizes [E]`, sum <= M) times `values int4
    [E, K, N] * scale [E, K/g, N]` -> `[M, N]` in x's dtype, zeros past the sum."""
    m, k, n, group = int4_dims(x_mk, values_ekn, scale_egn)
    num_experts = values_ekn.shape[0]
    cfg = config or default_config(m, k, n, num_experts)
    check_tiles(cfg, k, n, group)
    work = tiling.work_list(group_sizes_e, m, cfg.block_m)
    num_slots = work.group_ids.shape[0]
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, group=group),
        out_shape=jax.ShapeDtypeStruct((m, n), x_mk.dtype),
        grid=(num_slots, n // cfg.block_n),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        interpret=interpret,
        name="grouped_int4_matmul",
    )(work.group_ids, work.tile_ids, work.num_items, work.group_starts, work.group_ends,
      x_mk, values_ekn, scale_egn)
