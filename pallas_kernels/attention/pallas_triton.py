"""Blockwise attention forward as a Triton-lowered Pallas kernel (GPU).

Grid `(B, N, T/bq)`: each program holds one query block `[bq, K]` of one head in registers and
walks the head's key group `bk` keys at a time in a `fori_loop`, updating the online softmax in
float32; key blocks wholly above the causal diagonal of its queries are skipped. Triton blocks
are powers of two, so head dims are zero-padded to one (192 -> 256, 576 -> 1024).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention import layout, online_softmax


def _kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, out_ref, *, scale: float,
            block_k: int):
    """Refs `q [bq, K]`, `k [S, K]`, `v [S, U]`, positions / segments `[bq, 1]`, `[1, S]`,
    `out [bq, U]`."""
    q, q_pos, q_seg = q_ref[...], qp_ref[...], qs_ref[...]
    last_visible = jnp.max(q_pos)

    def step(j, carry):
        m_prev, total, acc = carry
        kv_pos = kp_ref[:, pl.ds(j * block_k, block_k)]

        def update():
            k = k_ref[pl.ds(j * block_k, block_k), :]
            v = v_ref[pl.ds(j * block_k, block_k), :]
            scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32) * scale
            mask = (kv_pos <= q_pos) & (ks_ref[:, pl.ds(j * block_k, block_k)] == q_seg)
            return online_softmax.update(m_prev, total, acc, scores, mask, v)

        return jax.lax.cond(jnp.min(kv_pos) <= last_visible, update, lambda: carry)

    bq, u = out_ref.shape
    _, total, acc = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, step,
                                      online_softmax.initial(bq, u))
    out_ref[...] = online_softmax.finish(total, acc, out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "interpret"))
def attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, *, scale: float,
              block_q: int = 64, block_k: int = 64, interpret: bool = False):
    """`reference.attention`'s contract (segments required: pass zeros for none)."""
    a, block_q = layout.prepare(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs,
                       block_q=block_q, block_k=block_k, pow2_dims=True)
    b, n, tp, kd = a.q_bntk.shape
    g, sp, u = a.k_bgsk.shape[1], a.k_bgsk.shape[2], a.v_bgsu.shape[-1]
    heads_per_group = n // g
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, block_k=block_k),
        out_shape=jax.ShapeDtypeStruct((b, n, tp, u), v_bsgu.dtype),
        grid=(b, n, tp // block_q),
        in_specs=[
            pl.BlockSpec((None, None, block_q, kd), lambda b, h, i: (b, h, i, 0)),
            pl.BlockSpec((None, None, sp, kd), lambda b, h, i: (b, h // heads_per_group, 0, 0)),
            pl.BlockSpec((None, None, sp, u), lambda b, h, i: (b, h // heads_per_group, 0, 0)),
            pl.BlockSpec((None, block_q, 1), lambda b, h, i: (b, i, 0)),
            pl.BlockSpec((None, 1, sp), lambda b, h, i: (b, 0, 0)),
            pl.BlockSpec((None, block_q, 1), lambda b, h, i: (b, i, 0)),
            pl.BlockSpec((None, 1, sp), lambda b, h, i: (b, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, block_q, u), lambda b, h, i: (b, h, i, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="blockwise_attention",
    )(*a[:7])
    return layout.finish(out, a)
