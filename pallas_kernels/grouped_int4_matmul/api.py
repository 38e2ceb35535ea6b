"""Entry point of the grouped INT4 matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_int4_matmul(x_mk: jax.Array, values_ekn: jax.Array, scale_egn: jax.Array,
                        group_sizes_e: jax.Array, impl: str = "auto") -> jax.Array:
    """Rows of `x [M, K]`, sorted by expert with `group_sizes [E]`, times expert INT4 weights."""
    e, k, n = values_ekn.shape
    g = scale_egn.shape[1]
    w = (values_ekn.astype(jnp.float32).reshape(e, g, k // g, n)
         * scale_egn.astype(jnp.float32)[:, :, None, :]).reshape(e, k, n)
    return jax.lax.ragged_dot(x_mk, w.astype(x_mk.dtype), group_sizes_e,
                              preferred_element_type=jnp.float32).astype(x_mk.dtype)
