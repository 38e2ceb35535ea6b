"""Blockwise attention with an online softmax (the flash-attention recurrence) in XLA.

Same contract as `reference.attention`. The keys are taken `block` at a time (`lax.scan`),
carrying each query's running maximum, normaliser and unnormalised output, so the largest
intermediate is `[B, T, N, block]`: memory grows linearly in T. The backward pass
(`jax.custom_vjp`) saves only the output and each query's log-sum-exp and recomputes the
probabilities block by block, so no `[T, S]` residual is kept either. Score arithmetic is
float32 throughout, the probabilities cast to v's dtype for the value matmul as the reference
does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.attention.reference import NEG_INF

_NEVER = jnp.iinfo(jnp.int32).max  # position of a padding key: visible to no query


def _key_blocks(k_bsgk, v_bsgu, kv_pos_bs, kv_seg_bs, block: int):
    """Keys, values, positions and segments as `[S/block, B, block, ...]`, padded with keys no
    query sees."""
    s = k_bsgk.shape[1]
    pad = -s % block

    def split(x, fill=0):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)

    segs = None if kv_seg_bs is None else split(kv_seg_bs)
    return split(k_bsgk), split(v_bsgu), split(kv_pos_bs, _NEVER), segs


def _scores_and_mask(q_btgmk, k_b, pos_b, seg_b, q_pos_bt, q_seg_bt, scale):
    scores = jnp.einsum("btgmk,bsgk->btgms", q_btgmk, k_b,
                        preferred_element_type=jnp.float32) * scale
    mask = pos_b[:, None, :] <= q_pos_bt[:, :, None]
    if q_seg_bt is not None:
        mask &= q_seg_bt[:, :, None] == seg_b[:, None, :]
    return scores, mask[:, :, None, None, :]


def _forward(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, scale, block):
    b, t, n, kd = q_btnk.shape
    g, u = k_bsgk.shape[2], v_bsgu.shape[-1]
    q = q_btnk.reshape(b, t, g, n // g, kd)
    blocks = _key_blocks(k_bsgk, v_bsgu, kv_pos_bs, kv_seg_bs, block)

    def step(carry, blk):
        max_btgm, sum_btgm, acc_btgmu = carry
        k_b, v_b, pos_b, seg_b = blk
        scores, mask = _scores_and_mask(q, k_b, pos_b, seg_b, q_pos_bt, q_seg_bt, scale)
        new_max = jnp.maximum(max_btgm, jnp.max(jnp.where(mask, scores, NEG_INF), axis=-1))
        probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
        rescale = jnp.exp(max_btgm - new_max)
        acc_btgmu = acc_btgmu * rescale[..., None] + jnp.einsum(
            "btgms,bsgu->btgmu", probs.astype(v_b.dtype), v_b,
            preferred_element_type=jnp.float32)
        return (new_max, sum_btgm * rescale + jnp.sum(probs, axis=-1), acc_btgmu), None

    init = common.varying_like(
        (jnp.full((b, t, g, n // g), NEG_INF, jnp.float32),
         jnp.zeros((b, t, g, n // g), jnp.float32), jnp.zeros((b, t, g, n // g, u), jnp.float32)),
        q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs)
    (max_btgm, sum_btgm, acc_btgmu), _ = jax.lax.scan(step, init, blocks)
    seen = sum_btgm > 0  # a query that sees no key: zeros, as the reference
    out = jnp.where(seen[..., None], acc_btgmu / jnp.where(seen, sum_btgm, 1.0)[..., None], 0.0)
    lse_btgm = max_btgm + jnp.log(jnp.where(seen, sum_btgm, 1.0))
    return out.reshape(b, t, n, u).astype(v_bsgu.dtype), lse_btgm


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, scale, block):
    return _forward(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, scale,
                    block)[0]


def _attention_fwd(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, scale,
                   block):
    out, lse = _forward(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, scale,
                        block)
    return out, (q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, out, lse)


def _attention_bwd(scale, block, residuals, d_out_btnu):
    q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, out, lse_btgm = residuals
    b, t, n, kd = q_btnk.shape
    s, g, u = k_bsgk.shape[1], k_bsgk.shape[2], v_bsgu.shape[-1]
    q = q_btnk.reshape(b, t, g, n // g, kd)
    d_out = d_out_btnu.astype(jnp.float32).reshape(b, t, g, n // g, u)
    # d softmax: ds = p * (dp - sum_u(d_out * out)), the row term computed once.
    delta_btgm = jnp.sum(d_out * out.astype(jnp.float32).reshape(d_out.shape), axis=-1)
    blocks = _key_blocks(k_bsgk, v_bsgu, kv_pos_bs, kv_seg_bs, block)

    def step(dq_btgmk, blk):
        k_b, v_b, pos_b, seg_b = blk
        scores, mask = _scores_and_mask(q, k_b, pos_b, seg_b, q_pos_bt, q_seg_bt, scale)
        probs = jnp.where(mask, jnp.exp(scores - lse_btgm[..., None]), 0.0)
        dv_b = jnp.einsum("btgms,btgmu->bsgu", probs.astype(v_b.dtype).astype(jnp.float32),
                          d_out)
        dp = jnp.einsum("btgmu,bsgu->btgms", d_out, v_b, preferred_element_type=jnp.float32)
        ds = probs * (dp - delta_btgm[..., None]) * scale
        dq_btgmk = dq_btgmk + jnp.einsum("btgms,bsgk->btgmk", ds, k_b,
                                         preferred_element_type=jnp.float32)
        dk_b = jnp.einsum("btgms,btgmk->bsgk", ds, q, preferred_element_type=jnp.float32)
        return dq_btgmk, (dk_b, dv_b)

    dq_init = common.varying_like(jnp.zeros(q.shape, jnp.float32), residuals, d_out_btnu)
    dq, (dk, dv) = jax.lax.scan(step, dq_init, blocks)

    def unblock(x_nbs):  # [S/block, B, block, ...] -> [B, S, ...]
        x = jnp.moveaxis(x_nbs, 0, 1)
        return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :s]

    return (dq.reshape(q_btnk.shape).astype(q_btnk.dtype), unblock(dk).astype(k_bsgk.dtype),
            unblock(dv).astype(v_bsgu.dtype), None, None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt=None, kv_seg_bs=None, *,
              scale: float, block: int = 512):
    """`[B, T, N, U]` in v's dtype; keys `block` at a time (fewer when S is shorter)."""
    block = max(1, min(block, k_bsgk.shape[1]))
    return _attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs,
                      float(scale), block)
