"""Blockwise attention forward as a Mosaic TPU Pallas kernel.

Grid `(B, N, T/bq, S/bk)`, keys innermost: each step DMAs one query block `[bq, K]`, one key and
value block `[bk, K]`, `[bk, U]` of the head's key group, and their positions and segments into
VMEM and updates the online softmax (running max, normaliser and float32 output in VMEM
scratch), written out at the last key block. A key block nobody in the query block can see
(above the causal diagonal) skips its matmuls. q/k dim 192 with v dim 128 (expanded MLA) and
576 with 512 (absorbed MLA) are taken whole, as full-dimension blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention import layout, online_softmax


def _kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, out_ref, m_ref, l_ref, acc_ref,
            *, scale: float):
    """Refs `q [bq, K]`, `k [bk, K]`, `v [bk, U]`, positions / segments `[bq, 1]` and `[1, bk]`,
    `out [bq, U]`; scratch `m`, `l` `[bq, 1]` and `acc [bq, U]` float32."""
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...], l_ref[...], acc_ref[...] = online_softmax.initial(*acc_ref.shape)

    q_pos, kv_pos = qp_ref[...], kp_ref[...]

    @pl.when(jnp.min(kv_pos) <= jnp.max(q_pos))
    def _update():
        scores = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * scale
        mask = (kv_pos <= q_pos) & (ks_ref[...] == qs_ref[...])
        m_ref[...], l_ref[...], acc_ref[...] = online_softmax.update(
            m_ref[...], l_ref[...], acc_ref[...], scores, mask, v_ref[...])

    @pl.when(j == pl.num_programs(3) - 1)
    def _store():
        out_ref[...] = online_softmax.finish(l_ref[...], acc_ref[...], out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "interpret"))
def attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs, *, scale: float,
              block_q: int = 128, block_k: int = 512, interpret: bool = False):
    """`reference.attention`'s contract (segments required: pass zeros for none)."""
    a, block_q = layout.prepare(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs,
                       block_q=block_q, block_k=block_k, pow2_dims=False)
    b, n, tp, kd = a.q_bntk.shape
    g, sp, u = a.k_bgsk.shape[1], a.k_bgsk.shape[2], a.v_bgsu.shape[-1]
    heads_per_group = n // g
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale),
        out_shape=jax.ShapeDtypeStruct((b, n, tp, u), v_bsgu.dtype),
        grid=(b, n, tp // block_q, sp // block_k),
        in_specs=[
            pl.BlockSpec((None, None, block_q, kd), lambda b, h, i, j: (b, h, i, 0)),
            pl.BlockSpec((None, None, block_k, kd),
                         lambda b, h, i, j: (b, h // heads_per_group, j, 0)),
            pl.BlockSpec((None, None, block_k, u),
                         lambda b, h, i, j: (b, h // heads_per_group, j, 0)),
            pl.BlockSpec((None, block_q, 1), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec((None, 1, block_k), lambda b, h, i, j: (b, 0, j)),
            pl.BlockSpec((None, block_q, 1), lambda b, h, i, j: (b, i, 0)),
            pl.BlockSpec((None, 1, block_k), lambda b, h, i, j: (b, 0, j)),
        ],
        out_specs=pl.BlockSpec((None, None, block_q, u), lambda b, h, i, j: (b, h, i, 0)),
        scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, u), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="blockwise_attention",
    )(*a[:7])
    return layout.finish(out, a)
