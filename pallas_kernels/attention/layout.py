"""The argument handling both Pallas attention kernels share: head-major layout, padding to
whole blocks, positions and segments shaped for the kernels' blocks.

A padded query has position -1 (it sees nothing); a padded key has position INT32_MAX (nobody
sees it); absent segments are all zeros. Head dims are zero-padded to `dim_multiple` where the
backend needs it (zeros change no dot product).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEVER = jnp.iinfo(jnp.int32).max


class KernelArgs(NamedTuple):
    q_bntk: jax.Array  # [B, N, Tp, Kp]
    k_bgsk: jax.Array  # [B, G, Sp, Kp]
    v_bgsu: jax.Array  # [B, G, Sp, Up]
    q_pos_bt1: jax.Array  # int32 [B, Tp, 1]
    kv_pos_b1s: jax.Array  # int32 [B, 1, Sp]
    q_seg_bt1: jax.Array
    kv_seg_b1s: jax.Array
    t: int  # unpadded query length and value dim
    u: int
    folded_heads: int  # N when the heads of one shared key were folded into the queries, else 0


def _pad_to(x, axis: int, multiple: int, value=0):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def prepare(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, *,
            block_q: int, block_k: int, pow2_dims: bool) -> tuple[KernelArgs, int]:
    """The kernel's arguments and the query block it should use (at most `block_q`)."""
    b, t, n, _ = q_btnk.shape
    u = v_bsgu.shape[-1]
    if q_seg_bt is None:
        q_seg_bt, kv_seg_bs = jnp.zeros_like(q_pos_bt), jnp.zeros_like(kv_pos_bs)
    folded = 0
    if k_bsgk.shape[2] == 1 and n > 1:
        # One key for every head (absorbed MLA): the heads are more query rows of that key, so
        # a decode step (T = 1) fills a block with its 64 heads instead of padding one query.
        q_btnk = q_btnk.reshape(b, t * n, 1, q_btnk.shape[-1])
        q_pos_bt, q_seg_bt = jnp.repeat(q_pos_bt, n, axis=1), jnp.repeat(q_seg_bt, n, axis=1)
        folded = n
    rows = q_btnk.shape[1]
    block_q = min(block_q, -(-rows // 8) * 8 if not pow2_dims else max(16, next_pow2(rows)))
    q = _pad_to(jnp.transpose(q_btnk, (0, 2, 1, 3)), 2, block_q)
    k = _pad_to(jnp.transpose(k_bsgk, (0, 2, 1, 3)), 2, block_k)
    v = _pad_to(jnp.transpose(v_bsgu, (0, 2, 1, 3)), 2, block_k)
    if pow2_dims:
        kd = next_pow2(q.shape[-1])
        q, k = _pad_to(q, 3, kd), _pad_to(k, 3, kd)
        v = _pad_to(v, 3, next_pow2(u))
    q_pos = _pad_to(q_pos_bt.astype(jnp.int32), 1, block_q, -1)[:, :, None]
    kv_pos = _pad_to(kv_pos_bs.astype(jnp.int32), 1, block_k, NEVER)[:, None, :]
    q_seg = _pad_to(q_seg_bt.astype(jnp.int32), 1, block_q)[:, :, None]
    kv_seg = _pad_to(kv_seg_bs.astype(jnp.int32), 1, block_k)[:, None, :]
    return KernelArgs(q, k, v, q_pos, kv_pos, q_seg, kv_seg, t, u, folded), block_q


def finish(out_bntu, args: KernelArgs):
    """The kernel's `[B, N, Tp, Up]` output as `[B, T, N, U]`."""
    if args.folded_heads:
        n = args.folded_heads
        out = out_bntu[:, 0, :args.t * n, :args.u]
        return out.reshape(out.shape[0], args.t, n, args.u)
    return jnp.transpose(out_bntu[:, :, :args.t, :args.u], (0, 2, 1, 3))
