"""Paged latent attention forward as a Triton-lowered Pallas kernel (GPU).

Grid `(B, rows/bq)`: each program holds one block of query rows (heads folded in, so a decode
step's 64 heads are one block) and walks its row's page table up to the last visible page,
loading page `table[w]` of the layer straight from the pools in HBM, `[page, C]` latent and
`[page, R]` rope at a time, and updating the online softmax in float32. The pools are read
where they lie: no gathered copy of the context. Latent, rope and page sizes are powers of two
(K2: 512, 64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention import layout, online_softmax


def _kernel(q_ref, qpe_ref, qp_ref, table_ref, layer_ref, ckv_ref, kpe_ref, out_ref, *,
            scale: float, num_pages: int):
    """Refs `q [bq, C]`, `qpe [bq, R]`, `qp [bq, 1]`, `table [W]`, `layer [1]`, the pools
    `ckv [L, P, page, C]`, `kpe [L, P, page, R]`, `out [bq, C]`."""
    q, qpe, q_pos = q_ref[...], qpe_ref[...], qp_ref[...]
    layer = layer_ref[0]
    page_size = ckv_ref.shape[2]
    width = table_ref.shape[0]
    visible_pages = jnp.minimum((jnp.max(q_pos) + page_size) // page_size, width)

    def step(w, carry):
        m_prev, total, acc = carry
        page = table_ref[w]
        slot = jnp.minimum(page, num_pages - 1)
        ckv = ckv_ref[layer, slot, :, :].astype(q.dtype)
        kpe = kpe_ref[layer, slot, :, :].astype(q.dtype)
        dims = (((1,), (1,)), ((), ()))
        scores = (jax.lax.dot_general(q, ckv, dims, preferred_element_type=jnp.float32) +
                  jax.lax.dot_general(qpe, kpe, dims, preferred_element_type=jnp.float32)
                  ) * scale
        kv_pos = w * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
        mask = (kv_pos <= q_pos) & (page < num_pages)
        return online_softmax.update(m_prev, total, acc, scores, mask, ckv)

    bq, c = out_ref.shape
    _, total, acc = jax.lax.fori_loop(0, visible_pages, step,
                                      online_softmax.initial(bq, c))
    out_ref[...] = online_softmax.finish(total, acc, out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "interpret"))
def attention(q_latent_btnc, q_pe_btnr, ckv_lpsc, kpe_lpsr, page_table_bw, layer, q_pos_bt, *,
              scale: float, block_q: int = 64, interpret: bool = False):
    """`paged.reference`'s contract."""
    a, block_q = layout.prepare_paged(q_latent_btnc, q_pe_btnr, page_table_bw, layer, q_pos_bt,
                                      block_q=block_q, pow2_rows=True)
    b, rows, c = a.q_latent_brc.shape
    r = a.q_pe_brr.shape[-1]
    width = page_table_bw.shape[1]
    whole = lambda shape: pl.BlockSpec(shape, lambda b, i: (0,) * len(shape))  # noqa: E731
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, num_pages=ckv_lpsc.shape[1]),
        out_shape=jax.ShapeDtypeStruct((b, rows, c), q_latent_btnc.dtype),
        grid=(b, rows // block_q),
        in_specs=[
            pl.BlockSpec((None, block_q, c), lambda b, i: (b, i, 0)),
            pl.BlockSpec((None, block_q, r), lambda b, i: (b, i, 0)),
            pl.BlockSpec((None, block_q, 1), lambda b, i: (b, i, 0)),
            pl.BlockSpec((None, width), lambda b, i: (b, 0)),
            whole((1,)),
            whole(ckv_lpsc.shape),
            whole(kpe_lpsr.shape),
        ],
        out_specs=pl.BlockSpec((None, block_q, c), lambda b, i: (b, i, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=2),
        interpret=interpret,
        name="paged_latent_attention",
    )(a.q_latent_brc, a.q_pe_brr, a.q_pos_br1, a.table_flat.reshape(b, width), a.layer,
      ckv_lpsc, kpe_lpsr)
    return layout.finish_paged(out, a)
