"""INT4 dequant matmul as a Mosaic TPU Pallas kernel.

Grid `(M/bm, N/bn, K/bk)`, K innermost: each step DMAs `x [bm, bk]`, the int4 tile `[bk, bn]`
and its scales `[bk/g, bn]` into VMEM, dequantizes the tile there (TPU matrix units take no
bf16 x int4 product) and accumulates `x @ w` in a float32 VMEM scratch, written out at the
last K step. HBM holds only the 4.5-bit weight.

Decode (M <= 64) takes all rows in one block and wide weight tiles, so each grid step moves a
large slice of the weight; prefill uses `256`-row blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import check_tiles, dequantize, fitting_tile, int4_dims

_DECODE_MAX_M = 64
_LANES = 128


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes: `block_n` a multiple of 128 (or N), `block_k` of 16 groups (or K)."""

    block_m: int
    block_n: int
    block_k: int


def default_config(m: int, k: int, n: int, group: int = 32) -> Config:
    """Decode (all rows, wide weight tiles) or prefill (256-row blocks) tiles, chosen by M."""
    # bf16 scales tile VMEM in (16, 128): a K block spans a multiple of 16 groups.
    k_align = 16 * group
    if m <= _DECODE_MAX_M:
        return Config(m, fitting_tile(n, 1024, _LANES), fitting_tile(k, 512, k_align))
    return Config(256, fitting_tile(n, 512, _LANES), fitting_tile(k, 512, k_align))


def _kernel(x_ref, values_ref, scale_ref, out_ref, acc_ref):
    """Refs `x [bm, bk]`, `values [bk, bn]`, `scale [bk/g, bn]`, `out [bm, bn]`, `acc` f32."""
    k_step = pl.program_id(2)

    @pl.when(k_step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = x_ref[...]
    w = dequantize(values_ref[...], scale_ref[...], x.dtype)
    acc_ref[...] += jnp.dot(x, w, preferred_element_type=jnp.float32)

    @pl.when(k_step == pl.num_programs(2) - 1)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def int4_matmul(x_mk: jax.Array, values_kn: jax.Array, scale_gn: jax.Array, *,
                config: Config | None = None, interpret: bool = False) -> jax.Array:
    """`x [M, K] @ (values int4 [K, N] * scale [K/g, N])` -> `[M, N]` in x's dtype."""
    m, k, n, group = int4_dims(x_mk, values_kn, scale_gn)
    cfg = config or default_config(m, k, n, group)
    check_tiles(cfg, k, n, group)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    return pl.pallas_call(
        _kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x_mk.dtype),
        grid=(pl.cdiv(m, bm), n // bn, k // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
            pl.BlockSpec((bk // group, bn), lambda i, j, kk: (kk, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="int4_matmul",
    )(x_mk, values_kn, scale_gn)
