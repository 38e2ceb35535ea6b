"""Entry point of the INT4 dequant matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def int4_matmul(x_mk: jax.Array, values_kn: jax.Array, scale_gn: jax.Array,
                impl: str = "auto") -> jax.Array:
    """`x [M, K] @ (values int4 [K, N] * scale [K/g, N])` -> `[M, N]` in x's dtype."""
    k, n = values_kn.shape
    g = scale_gn.shape[0]
    w = (values_kn.astype(jnp.float32).reshape(g, k // g, n)
         * scale_gn.astype(jnp.float32)[:, None, :]).reshape(k, n)
    return jnp.dot(x_mk, w.astype(x_mk.dtype), preferred_element_type=jnp.float32).astype(x_mk.dtype)
