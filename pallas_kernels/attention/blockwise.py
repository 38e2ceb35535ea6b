"""Blockwise attention with an online softmax (the flash-attention recurrence) in XLA.

Same contract as `reference.attention`. Queries are taken `block_q` at a time and, for each
query block, the keys `block` at a time (`lax.scan`), carrying each query's running maximum,
normaliser and unnormalised output, so the largest intermediate is `[B, block_q, N, block]` and
memory grows linearly in T. A key block no query of the block can see (above the causal
diagonal) is skipped (`lax.cond`), about half of a causal T x T. The backward pass
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


def _blocks(x, block: int, fill=0):
    """`[B, L, ...]` as `[L/block, B, block, ...]`, padded with `fill`."""
    pad = -x.shape[1] % block
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def _unblock(x_nbl, length: int):
    """Inverse of `_blocks`: `[L/block, B, block, ...]` -> `[B, L, ...]`."""
    x = jnp.moveaxis(x_nbl, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _key_blocks(k_bsgk, v_bsgu, kv_pos_bs, kv_seg_bs, block: int):
    """Keys, values, positions and segments `[S/block, B, block, ...]` (None for absent values
    or segments), padded with keys no query sees."""
    segs = None if kv_seg_bs is None else _blocks(kv_seg_bs, block)
    values = None if v_bsgu is None else _blocks(v_bsgu, block)
    return _blocks(k_bsgk, block), values, _blocks(kv_pos_bs, block, _NEVER), segs


def _query_blocks(q_btgmk, q_pos_bt, q_seg_bt, block: int):
    """Queries, positions and segments `[T/block, B, block, ...]`, padded with queries that see
    nothing."""
    segs = None if q_seg_bt is None else _blocks(q_seg_bt, block)
    return _blocks(q_btgmk, block), _blocks(q_pos_bt, block, -1), segs


def _scores_and_mask(q_btgmk, k_b, pos_b, seg_b, q_pos_bt, q_seg_bt, scale):
    scores = jnp.einsum("btgmk,bsgk->btgms", q_btgmk, k_b,
                        preferred_element_type=jnp.float32) * scale
    mask = pos_b[:, None, :] <= q_pos_bt[:, :, None]
    if q_seg_bt is not None:
        mask &= q_seg_bt[:, :, None] == seg_b[:, None, :]
    return scores, mask[:, :, None, None, :]


def _seen_by(pos_b, q_pos_bt):
    """Whether any query of the block can see any key of the key block: a key block wholly
    above the causal diagonal of the query block is skipped (about half of a causal T x T)."""
    return jnp.min(pos_b) <= jnp.max(q_pos_bt)


def _forward(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, scale, block,
             block_q):
    b, t, n, kd = q_btnk.shape
    g, u = k_bsgk.shape[2], v_bsgu.shape[-1]
    m = n // g
    keys = _key_blocks(k_bsgk, v_bsgu, kv_pos_bs, kv_seg_bs, block)
    queries = _query_blocks(q_btnk.reshape(b, t, g, m, kd), q_pos_bt, q_seg_bt, block_q)

    def query_block(qblk):
        q, q_pos, q_seg = qblk

        def step(carry, blk):
            k_b, v_b, pos_b, seg_b = blk

            def update(carry):
                max_btgm, sum_btgm, acc_btgmu = carry
                scores, mask = _scores_and_mask(q, k_b, pos_b, seg_b, q_pos, q_seg, scale)
                new_max = jnp.maximum(max_btgm,
                                      jnp.max(jnp.where(mask, scores, NEG_INF), axis=-1))
                probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
                rescale = jnp.exp(max_btgm - new_max)
                acc_btgmu = acc_btgmu * rescale[..., None] + jnp.einsum(
                    "btgms,bsgu->btgmu", probs.astype(v_b.dtype), v_b,
                    preferred_element_type=jnp.float32)
                return new_max, sum_btgm * rescale + jnp.sum(probs, axis=-1), acc_btgmu

            return jax.lax.cond(_seen_by(pos_b, q_pos), update, lambda c: c, carry), None

        rows = q.shape[:4]
        init = common.varying_like(
            (jnp.full(rows, NEG_INF, jnp.float32), jnp.zeros(rows, jnp.float32),
             jnp.zeros((*rows, u), jnp.float32)), q, q_pos, q_seg, keys)
        (max_btgm, sum_btgm, acc_btgmu), _ = jax.lax.scan(step, init, keys)
        seen = sum_btgm > 0  # a query that sees no key: zeros, as the reference
        out = jnp.where(seen[..., None],
                        acc_btgmu / jnp.where(seen, sum_btgm, 1.0)[..., None], 0.0)
        return out.astype(v_bsgu.dtype), max_btgm + jnp.log(jnp.where(seen, sum_btgm, 1.0))

    out, lse = jax.lax.map(query_block, queries)
    return _unblock(out, t).reshape(b, t, n, u), _unblock(lse, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, scale, block,
               block_q):
    return _forward(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, scale,
                    block, block_q)[0]


def _attention_fwd(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, scale,
                   block, block_q):
    out, lse = _forward(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, scale,
                        block, block_q)
    return out, (q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, out, lse)


def _attention_bwd(scale, block, block_q, residuals, d_out_btnu):
    q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, out, lse_btgm = residuals
    b, t, n, kd = q_btnk.shape
    s, g, u = k_bsgk.shape[1], k_bsgk.shape[2], v_bsgu.shape[-1]
    m = n // g
    d_out = d_out_btnu.astype(jnp.float32).reshape(b, t, g, m, u)
    # d softmax: ds = p * (dp - sum_u(d_out * out)), the row term computed once.
    delta_btgm = jnp.sum(d_out * out.astype(jnp.float32).reshape(d_out.shape), axis=-1)
    keys = _key_blocks(k_bsgk, v_bsgu, kv_pos_bs, kv_seg_bs, block)
    queries = _query_blocks(q_btnk.reshape(b, t, g, m, kd), q_pos_bt, q_seg_bt, block_q) + (
        _blocks(d_out, block_q), _blocks(lse_btgm, block_q), _blocks(delta_btgm, block_q))

    def query_block(dkv, qblk):
        q, q_pos, q_seg, d_out, lse, delta = qblk

        def step(dq_btgmk, blk):
            k_b, v_b, pos_b, seg_b = blk

            def update(dq_btgmk):
                scores, mask = _scores_and_mask(q, k_b, pos_b, seg_b, q_pos, q_seg, scale)
                probs = jnp.where(mask, jnp.exp(scores - lse[..., None]), 0.0)
                dv_b = jnp.einsum("btgms,btgmu->bsgu",
                                  probs.astype(v_b.dtype).astype(jnp.float32), d_out)
                dp = jnp.einsum("btgmu,bsgu->btgms", d_out, v_b,
                                preferred_element_type=jnp.float32)
                ds = probs * (dp - delta[..., None]) * scale
                dq_btgmk = dq_btgmk + jnp.einsum("btgms,bsgk->btgmk", ds, k_b,
                                                 preferred_element_type=jnp.float32)
                dk_b = jnp.einsum("btgms,btgmk->bsgk", ds, q,
                                  preferred_element_type=jnp.float32)
                return dq_btgmk, (dk_b, dv_b)

            def skip(dq_btgmk):
                return dq_btgmk, common.varying_like(
                    (jnp.zeros(k_b.shape, jnp.float32), jnp.zeros(v_b.shape, jnp.float32)),
                    q, d_out, k_b, v_b)

            return jax.lax.cond(_seen_by(pos_b, q_pos), update, skip, dq_btgmk)

        dq_init = common.varying_like(jnp.zeros(q.shape, jnp.float32), q, d_out, keys)
        dq, (dk, dv) = jax.lax.scan(step, dq_init, keys)
        return (dkv[0] + dk, dkv[1] + dv), dq

    dkv_init = common.varying_like(
        (jnp.zeros(keys[0].shape, jnp.float32), jnp.zeros(keys[1].shape, jnp.float32)),
        residuals, d_out_btnu)
    (dk, dv), dq = jax.lax.scan(query_block, dkv_init, queries)
    return (_unblock(dq, t).reshape(q_btnk.shape).astype(q_btnk.dtype),
            _unblock(dk, s).astype(k_bsgk.dtype), _unblock(dv, s).astype(v_bsgu.dtype),
            None, None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def max_scores(q_btnk, k_bsgk, q_pos_bt, kv_pos_bs, q_seg_bt=None, kv_seg_bs=None, *,
               scale: float, block: int = 512, block_q: int = 512):
    """Each query's largest visible score (scale included), `[B, T, N]` float32, block by
    block like the attention (`NEG_INF` for a query that sees nothing): the statistic QK-clip
    reads, without a `[T, S]` matrix. Not differentiated (a statistic)."""
    b, t, n, kd = q_btnk.shape
    g = k_bsgk.shape[2]
    block = max(1, min(block, k_bsgk.shape[1]))
    block_q = max(1, min(block_q, t))
    q_btnk, k_bsgk = jax.lax.stop_gradient(q_btnk), jax.lax.stop_gradient(k_bsgk)
    keys = _key_blocks(k_bsgk, None, kv_pos_bs, kv_seg_bs, block)
    queries = _query_blocks(q_btnk.reshape(b, t, g, n // g, kd), q_pos_bt, q_seg_bt, block_q)

    def query_block(qblk):
        q, q_pos, q_seg = qblk

        def step(max_btgm, blk):
            k_b, _, pos_b, seg_b = blk

            def update(max_btgm):
                scores, mask = _scores_and_mask(q, k_b, pos_b, seg_b, q_pos, q_seg, scale)
                return jnp.maximum(max_btgm, jnp.max(jnp.where(mask, scores, NEG_INF), -1))

            return jax.lax.cond(_seen_by(pos_b, q_pos), update, lambda m: m, max_btgm), None

        init = common.varying_like(jnp.full(q.shape[:4], NEG_INF, jnp.float32), q, q_pos, keys)
        return jax.lax.scan(step, init, keys)[0]

    return _unblock(jax.lax.map(query_block, queries), t).reshape(b, t, n)


def attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt=None, kv_seg_bs=None, *,
              scale: float, block: int = 512, block_q: int = 512):
    """`[B, T, N, U]` in v's dtype; `block_q` queries against `block` keys at a time (fewer
    when T or S is shorter)."""
    block = max(1, min(block, k_bsgk.shape[1]))
    block_q = max(1, min(block_q, q_btnk.shape[1]))
    # Under `jax.checkpoint` what is computed from non-differentiated inputs alone is saved, not
    # recomputed: the masks of every (query block, key block) pair, T^2 in all. Tied to the
    # queries, positions and segments count as differentiated and the masks are recomputed.
    q_btnk, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs = jax.lax.optimization_barrier(
        (q_btnk, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs))
    return _attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs,
                      float(scale), block, block_q)
