"""Pure-JAX INT4 dequant matmul: the CPU fallback and the numerics the kernels are held to.

Dequantizes the whole weight to the activation dtype and calls one dot with a float32
accumulator. Differentiable in `x` (and `scale`); XLA materialises the dequantized weight, which
is what the Pallas kernels avoid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import dequantize


@jax.jit
def int4_matmul(x_mk: jax.Array, values_kn: jax.Array, scale_gn: jax.Array) -> jax.Array:
    """`x [M, K] @ (values int4 [K, N] * scale [K/g, N])` -> `[M, N]` in x's dtype."""
    w_kn = dequantize(values_kn, scale_gn, x_mk.dtype)
    return jnp.dot(x_mk, w_kn, preferred_element_type=jnp.float32).astype(x_mk.dtype)
