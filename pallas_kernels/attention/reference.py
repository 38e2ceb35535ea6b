"""Plain attention: the whole `[B, T, N, S]` score matrix, a masked softmax, one matmul.

Shapes: q `[B, T, N, K]`, k `[B, S, G, K]`, v `[B, S, G, U]` with N = G x M heads (G = N:
multi-head; G = 1: one key and value shared by every head, as absorbed MLA's latent). Key s is
visible to query t iff `kv_pos[s] <= q_pos[t]` and, given segment ids, they are equal. Scores are
float32; a query that sees no key gets zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite: fully masked rows give zeros, not NaN


def visible(q_pos_bt, kv_pos_bs, q_seg_bt=None, kv_seg_bs=None):
    """`[B, T, S]`: which keys each query sees."""
    mask = kv_pos_bs[:, None, :] <= q_pos_bt[:, :, None]
    if q_seg_bt is not None:
        mask &= q_seg_bt[:, :, None] == kv_seg_bs[:, None, :]
    return mask


def attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt=None, kv_seg_bs=None, *,
              scale: float):
    """`[B, T, N, U]` in v's dtype."""
    b, t, n, kd = q_btnk.shape
    g = k_bsgk.shape[2]
    q = q_btnk.reshape(b, t, g, n // g, kd)
    scores = jnp.einsum("btgmk,bsgk->btgms", q, k_bsgk,
                        preferred_element_type=jnp.float32) * scale
    mask = visible(q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs)[:, :, None, None, :]
    probs = jax.nn.softmax(jnp.where(mask, scores, NEG_INF), axis=-1)
    probs = jnp.where(mask, probs, 0.0).astype(v_bsgu.dtype)
    out = jnp.einsum("btgms,bsgu->btgmu", probs, v_bsgu)
    return out.reshape(b, t, n, v_bsgu.shape[-1])
