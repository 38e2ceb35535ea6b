"""The grouped matmul op: expert-sorted rows times per-expert weights, float or INT4.

Every implementation sits behind `grouped_matmul` (and the SwiGLU of three of them,
`expert_swiglu`), and `choose` alone decides which runs:

    reference  `lax.ragged_dot` (INT4 dequantized first): GPU/TPU with float weights
    tiled      a loop over row tiles of the routed experts only (`tiled`): XLA:CPU, whose
               `ragged_dot` multiplies every row by every expert
    triton     the Pallas INT4 kernel for GPU
    tpu        the Pallas INT4 kernel for TPU (Mosaic)

All are differentiable in `x`, in a float weight and in the INT4 scale (the kernels borrow the
reference's gradient, the tile loop has its own).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.grouped_matmul import pallas_tpu, pallas_triton, reference, tiled
from pallas_kernels.quantized import QuantizedWeight

IMPLS = ("auto", "reference", "tiled", "pallas")


def choose(w, impl: str = "auto", platform: str | None = None,
           interpret: bool = False) -> str:
    """The implementation that runs: "reference", "tiled", "triton" or "tpu".

    Args:
      w: the weight (array or `QuantizedWeight`): only INT4 weights have Pallas kernels.
      impl: "auto" (by backend), "reference", "tiled" or "pallas" (the backend's kernel).
      platform, interpret: as for `common.resolve`.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "tiled":
        return "tiled"
    chosen = common.resolve(impl, platform, interpret)
    if impl == "auto" and chosen == "reference" and (platform or jax.default_backend()) == "cpu":
        return "tiled"
    if chosen != "reference" and not isinstance(w, QuantizedWeight):
        if impl == "pallas":
            raise ValueError("the Pallas grouped kernels take INT4 weights; float weights run "
                             "XLA's ragged_dot (impl='auto' or 'reference')")
        return "reference"
    return chosen


def grouped_matmul(x_mk: jax.Array, w_ekn: jax.Array | QuantizedWeight,
                   group_sizes_e: jax.Array, dtype=None, impl: str = "auto", *,
                   platform: str | None = None, interpret: bool = False,
                   config: pallas_triton.Config | pallas_tpu.Config | None = None,
                   tile_rows: int | None = None) -> jax.Array:
    """Rows of `x [M, K]`, sorted by expert, times each expert's weight -> `[M, N]`.

    Args:
      x_mk: activations `[M, K]` sorted by expert.
      w_ekn: float `[E, K, N]`, or an INT4 `QuantizedWeight` (values int4 `[E, K, N]`, scale
        `[E, K/g, N]`, g dividing K).
      group_sizes_e: int32 `[E]`, rows per expert in order; the sum may be below M, and rows
        past it come out as zeros (as `lax.ragged_dot`).
      dtype: compute and output dtype; x's by default.
      impl, platform, interpret: see `choose`.
      config: a Pallas kernel's block sizes (default: chosen from the rows per expert).
      tile_rows: the tile loop's rows per tile (default: from the rows per expert).
    """
    dtype = jnp.dtype(dtype or x_mk.dtype)
    x_mk = x_mk.astype(dtype)
    group_sizes_e = group_sizes_e.astype(jnp.int32)
    chosen = choose(w_ekn, impl, platform, interpret)
    if chosen == "tiled":
        return tiled.tiled_grouped_matmul(x_mk, w_ekn, group_sizes_e, dtype, tile_rows)
    if chosen == "reference":
        return reference.grouped_matmul(x_mk, w_ekn, group_sizes_e)
    backend = pallas_triton if chosen == "triton" else pallas_tpu
    kernel = functools.partial(backend.grouped_int4_matmul, config=config, interpret=interpret)
    return common.with_reference_vjp(kernel, reference.grouped_int4_matmul)(
        x_mk, w_ekn.values, w_ekn.scale, group_sizes_e).astype(dtype)


def expert_swiglu(x_md: jax.Array, gate_edf, up_edf, down_efd, group_sizes_e: jax.Array,
                  dtype, impl: str = "auto", **options) -> jax.Array:
    """Expert-sorted rows `x [M, D]` through their experts' SwiGLU
    `down(silu(x @ gate) * (x @ up))` -> `[M, D]`; rows past `sum(group_sizes)` give zeros.

    Weights `[E, D, F]`, `[E, D, F]`, `[E, F, D]`, float or INT4. The tile loop runs all three
    in one pass over the routed experts; the others are three `grouped_matmul`s. `options` as
    for `grouped_matmul`.
    """
    if choose(gate_edf, impl, options.get("platform"), options.get("interpret", False)) == "tiled":
        return tiled.tiled_expert_swiglu(x_md, gate_edf, up_edf, down_efd, group_sizes_e, dtype,
                                         options.get("tile_rows"))
    mm = functools.partial(grouped_matmul, group_sizes_e=group_sizes_e, dtype=dtype, impl=impl,
                           **options)
    x_md = x_md.astype(dtype)
    return mm(jax.nn.silu(mm(x_md, gate_edf)) * mm(x_md, up_edf), down_efd)
