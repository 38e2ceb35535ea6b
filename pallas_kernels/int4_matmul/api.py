"""Entry point of the INT4 dequant matmul: the Pallas kernel on GPU/TPU, XLA on CPU.

Both paths are differentiable in `x` and `scale`: the kernels borrow the reference's gradient.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import common
from pallas_kernels.int4_matmul import pallas_tpu, pallas_triton, reference


def int4_matmul(x_mk: jax.Array, values_kn: jax.Array, scale_gn: jax.Array, impl: str = "auto",
                *, platform: str | None = None, interpret: bool = False,
                config: pallas_triton.Config | pallas_tpu.Config | None = None) -> jax.Array:
    """`x [M, K] @ (values int4 [K, N] * scale [K/g, N])` -> `[M, N]` in x's dtype.

    Args:
      x_mk: activations `[M, K]`, usually bf16.
      values_kn: int4 `[K, N]`; scale_gn: `[K/g, N]`, g (the group) dividing K.
      impl: "auto" (Pallas on GPU/TPU, the XLA reference on CPU), "reference" or "pallas".
      platform: which Pallas kernel, "gpu" (Triton) or "tpu"; defaults to the default backend.
      interpret: run the Pallas kernel in interpret mode (tests on CPU).
      config: block sizes of that kernel; by default chosen from M (decode or prefill).
    """
    chosen = common.resolve(impl, platform, interpret)
    if chosen == "reference":
        return reference.int4_matmul(x_mk, values_kn, scale_gn)
    backend = pallas_triton if chosen == "triton" else pallas_tpu
    kernel = functools.partial(backend.int4_matmul, config=config, interpret=interpret)
    return common.with_reference_vjp(kernel, reference.int4_matmul)(x_mk, values_kn, scale_gn)
