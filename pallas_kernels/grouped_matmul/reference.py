"""Pure-JAX grouped matmul: XLA's `lax.ragged_dot`, and the numerics the kernels are held to.

An INT4 weight is dequantized whole to the activation dtype first. `ragged_dot` gives zeros for
rows past `sum(group_sizes)` and is differentiable in `x`, a float weight and the INT4 scale.
It materialises the dequantized weights `[E, K, N]`, which the Pallas kernels avoid; on XLA:CPU
it also multiplies every row by every expert (see `tiled`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import dequantize
from pallas_kernels.quantized import QuantizedWeight


def grouped_matmul(x_mk: jax.Array, w_ekn: jax.Array | QuantizedWeight,
                   group_sizes_e: jax.Array) -> jax.Array:
    """Rows of `x [M, K]` sorted by expert (`group_sizes [E]`) times `w [E, K, N]` (float, or
    INT4 `values * scale`) -> `[M, N]` in x's dtype."""
    if isinstance(w_ekn, QuantizedWeight):
        w_ekn = dequantize(w_ekn.values, w_ekn.scale, x_mk.dtype)
    return jax.lax.ragged_dot(x_mk, w_ekn.astype(x_mk.dtype), group_sizes_e.astype(jnp.int32),
                              preferred_element_type=jnp.float32).astype(x_mk.dtype)


@jax.jit
def grouped_int4_matmul(x_mk: jax.Array, values_ekn: jax.Array, scale_egn: jax.Array,
                        group_sizes_e: jax.Array) -> jax.Array:
    """`grouped_matmul` with the INT4 weight as two arrays (the kernels' signature)."""
    return grouped_matmul(x_mk, QuantizedWeight(values_ekn, scale_egn), group_sizes_e)
