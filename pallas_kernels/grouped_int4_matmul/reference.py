"""Pure-JAX grouped INT4 matmul: the CPU fallback and the numerics the kernels are held to.

Dequantizes every expert's weight to the activation dtype and calls `lax.ragged_dot`, which
gives zeros for rows past `sum(group_sizes)` and is differentiable in `x`. It materialises the
bf16 weights `[E, K, N]`, which the Pallas kernels avoid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import dequantize


@jax.jit
def grouped_int4_matmul(x_mk: jax.Array, values_ekn: jax.Array, scale_egn: jax.Array,
                        group_sizes_e: jax.Array) -> jax.Array:
    """Rows of `x [M, K]` sorted by expert (`group_sizes [E]`) times `values int4 [E, K, N] *
    scale [E, K/g, N]` -> `[M, N]` in x's dtype."""
    w_ekn = dequantize(values_ekn, scale_egn, x_mk.dtype)
    return jax.lax.ragged_dot(x_mk, w_ekn, group_sizes_e.astype(jnp.int32),
                              preferred_element_type=jnp.float32).astype(x_mk.dtype)
