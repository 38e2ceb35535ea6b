"""Entry point of the grouped INT4 matmul: the Pallas kernel on GPU/TPU, XLA on CPU.

Both paths are differentiable in `x` and `scale`: the kernels borrow the reference's gradient.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import common
from pallas_kernels.grouped_int4_matmul import pallas_tpu, pallas_triton, reference


def grouped_int4_matmul(x_mk: jax.Array, values_ekn: jax.Array, scale_egn: jax.Array,
                        group_sizes_e: jax.Array, impl: str = "auto", *,
                        platform: str | None = None, interpret: bool = False,
                        config: pallas_triton.Config | pallas_tpu.Config | None = None
                        ) -> jax.Array:
    """Rows of `x [M, K]`, sorted by expert, times each expert's INT4 weight -> `[M, N]`.

    Args:
      x_mk: activations `[M, K]` sorted by expert, usually bf16.
      values_ekn: int4 `[E, K, N]`; scale_egn: `[E, K/g, N]`, g (the group) dividing K.
      group_sizes_e: int32 `[E]`, rows per expert in order; the sum may be below M, and rows
        past it come out as zeros (as `lax.ragged_dot`).
      impl: "auto" (Pallas on GPU/TPU, the XLA reference on CPU), "reference" or "pallas".
      platform: which Pallas kernel, "gpu" (Triton) or "tpu"; defaults to the default backend.
      interpret: run the Pallas kernel in interpret mode (tests on CPU).
      config: block sizes of that kernel; by default chosen from the rows per expert.
    """
    chosen = common.resolve(impl, platform, interpret)
    if chosen == "reference":
        return reference.grouped_int4_matmul(x_mk, values_ekn, scale_egn, group_sizes_e)
    backend = pallas_triton if chosen == "triton" else pallas_tpu
    kernel = functools.partial(backend.grouped_int4_matmul, config=config, interpret=interpret)
    return common.with_reference_vjp(kernel, reference.grouped_int4_matmul)(
        x_mk, values_ekn, scale_egn, group_sizes_e)
