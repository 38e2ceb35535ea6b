"""The flash-attention recurrence on one block, shared by every Pallas attention kernel.

The kernels keep, per query row, the running maximum `m [bq, 1]`, the normaliser `l [bq, 1]`
and the unnormalised output `acc [bq, U]`, all float32, and fold in one key block at a time.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.attention.reference import NEG_INF


def initial(rows: int, u: int):
    """`(m, l, acc)` before the first key block."""
    return (jnp.full((rows, 1), NEG_INF, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, u), jnp.float32))


def update(m_prev, l_prev, acc_prev, scores_bk, mask_bk, v_ku):
    """`(m, l, acc)` after one key block: `scores [bq, bk]` float32 (scaled), `mask [bq, bk]`,
    values `[bk, U]`; the probabilities are cast to the values' dtype for their matmul."""
    scores_bk = jnp.where(mask_bk, scores_bk, NEG_INF)
    m_new = jnp.maximum(m_prev, jnp.max(scores_bk, axis=1, keepdims=True))
    probs = jnp.where(mask_bk, jnp.exp(scores_bk - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    return (m_new, alpha * l_prev + jnp.sum(probs, axis=1, keepdims=True),
            alpha * acc_prev + jnp.dot(probs.astype(v_ku.dtype), v_ku,
                                       preferred_element_type=jnp.float32))


def finish(l_total, acc, dtype):
    """The attention output `acc / l` in `dtype`; a row that saw no key gives zeros."""
    seen = l_total > 0
    return jnp.where(seen, acc / jnp.where(seen, l_total, 1.0), 0.0).astype(dtype)
