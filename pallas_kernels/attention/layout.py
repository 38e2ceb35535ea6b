"""The argument handling the Pallas attention kernels share (dense and paged): head-major layout,
padding to whole blocks, positions and segments shaped for the kernels' blocks.

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


class PagedArgs(NamedTuple):
    q_latent_brc: jax.Array  # [B, Rp, C]: query rows (T x N heads folded), padded
    q_pe_brr: jax.Array  # [B, Rp, R]
    q_pos_br1: jax.Array  # int32 [B, Rp, 1], -1 for padding rows
    table_flat: jax.Array  # int32 [B * W]: page ids, unallocated ones (>= P) kept
    kv_len_b: jax.Array  # int32 [B]: keys any query of the row can see (max position + 1)
    layer: jax.Array  # int32 [1]
    t: int
    n: int


def prepare_paged(q_latent_btnc, q_pe_btnr, page_table_bw, layer, q_pos_bt, *, block_q: int,
                  pow2_rows: bool) -> tuple[PagedArgs, int]:
    """The paged kernels' arguments and their query block (at most `block_q` rows).

    Every head reads the same latent key, so the heads are folded into query rows: a decode
    step's 64 heads fill one block instead of padding a single query.
    """
    b, t, n, c = q_latent_btnc.shape
    rows = t * n
    q_latent = q_latent_btnc.reshape(b, rows, c)
    q_pe = q_pe_btnr.reshape(b, rows, q_pe_btnr.shape[-1])
    q_pos = jnp.repeat(q_pos_bt.astype(jnp.int32), n, axis=1)
    block_q = min(block_q, max(16, next_pow2(rows)) if pow2_rows else -(-rows // 8) * 8)
    q_latent, q_pe = _pad_to(q_latent, 1, block_q), _pad_to(q_pe, 1, block_q)
    q_pos = _pad_to(q_pos, 1, block_q, -1)
    kv_len_b = jnp.maximum(jnp.max(q_pos, axis=1) + 1, 0)
    return PagedArgs(q_latent, q_pe, q_pos[:, :, None],
                     page_table_bw.astype(jnp.int32).reshape(-1), kv_len_b,
                     jnp.asarray(layer, jnp.int32).reshape(1), t, n), block_q


def finish_paged(out_brc, args: PagedArgs):
    """The kernel's `[B, Rp, C]` output as `[B, T, N, C]`."""
    b, _, c = out_brc.shape
    return out_brc[:, :args.t * args.n].reshape(b, args.t, args.n, c)
