"""INT4 dequant matmul as a Triton-lowered Pallas kernel (GPU).

Each program owns a `[bm, bn]` output tile and walks its share of K in a `fori_loop`: it loads
`x [bm, bk]`, the int4 tile `[bk, bn]` and its scales `[bk/g, bn]`, dequantizes in registers and
accumulates `x @ w` in float32. The bf16 weight never exists in HBM: the kernel reads 4.5 bits
per weight.

Decode (M <= 64) has few output tiles (`N / bn` programs for one row block), too few to keep
every SM streaming weights, so K is split across `k_splits` programs that write float32
partials `[S, M, N]`, summed afterwards (a few KB). Prefill uses larger square-ish tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import check_tiles, dequantize, int4_dims, largest_pow2_divisor

# Programs wanted in flight for decode: about two per SM on an H100/H200 (132 SMs).
_TARGET_PROGRAMS = 256
_DECODE_MAX_M = 64


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes: all powers of two; `block_k` a multiple of the quantization group."""

    block_m: int
    block_n: int
    block_k: int
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3


def default_config(m: int, k: int, n: int) -> Config:
    """Decode tiles (M <= 64, split K) or prefill tiles, chosen by M."""
    if m <= _DECODE_MAX_M:
        # tl.dot needs at least 16 rows; rows past M are masked.
        block_m = max(16, pl.next_power_of_2(m))
        block_n = largest_pow2_divisor(n, 64)
        block_k = largest_pow2_divisor(k, 256)
        programs = pl.cdiv(m, block_m) * (n // block_n)
        k_splits = 1
        while (programs * k_splits < _TARGET_PROGRAMS and k_splits < 8
               and (k // block_k) % (2 * k_splits) == 0):
            k_splits *= 2
        return Config(block_m, block_n, block_k, k_splits, num_warps=4, num_stages=4)
    block_m = 64 if m <= 256 else 128
    return Config(block_m, largest_pow2_divisor(n, 128), largest_pow2_divisor(k, 64),
                  num_warps=4 if block_m == 64 else 8, num_stages=3)


def _kernel(x_ref, values_ref, scale_ref, out_ref, *, block_k: int, group: int):
    """One `[bm, bn]` tile over this program's K range: refs `x [bm, Ks]`, `values [Ks, bn]`,
    `scale [Ks/g, bn]`, `out [bm, bn]`."""
    k_len = values_ref.shape[0]
    groups_per_block = block_k // group

    def step(i, acc):
        x = x_ref[:, pl.ds(i * block_k, block_k)]
        values = values_ref[pl.ds(i * block_k, block_k), :]
        scale = scale_ref[pl.ds(i * groups_per_block, groups_per_block), :]
        w = dequantize(values, scale, x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    acc = jax.lax.fori_loop(0, k_len // block_k, step, acc)
    out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def int4_matmul(x_mk: jax.Array, values_kn: jax.Array, scale_gn: jax.Array, *,
                config: Config | None = None, interpret: bool = False) -> jax.Array:
    """`x [M, K] @ (values int4 [K, N] * scale [K/g, N])` -> `[M, N]` in x's dtype."""
    m, k, n, group = int4_dims(x_mk, values_kn, scale_gn)
    cfg = config or default_config(m, k, n)
    splits = cfg.k_splits
    check_tiles(cfg, k, n, group, splits)
    k_len = k // splits
    out_dtype = jnp.float32 if splits > 1 else x_mk.dtype
    partials = pl.pallas_call(
        functools.partial(_kernel, block_k=cfg.block_k, group=group),
        out_shape=jax.ShapeDtypeStruct((splits, m, n), out_dtype),
        grid=(pl.cdiv(m, cfg.block_m), n // cfg.block_n, splits),
        in_specs=[
            pl.BlockSpec((cfg.block_m, k_len), lambda i, j, s: (i, s)),
            pl.BlockSpec((k_len, cfg.block_n), lambda i, j, s: (s, j)),
            pl.BlockSpec((k_len // group, cfg.block_n), lambda i, j, s: (s, j)),
        ],
        out_specs=pl.BlockSpec((pl.squeezed, cfg.block_m, cfg.block_n),
                               lambda i, j, s: (s, i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        interpret=interpret,
        name="int4_matmul",
    )(x_mk, values_kn, scale_gn)
    if splits == 1:
        return partials[0]
    return partials.sum(axis=0).astype(x_mk.dtype)
