"""Paged latent attention forward as a Mosaic TPU Pallas kernel.

Grid `(B, rows/bq, W)`, pages innermost. The page table, the layer and each row's visible length
are scalar-prefetched into SMEM, so the index maps DMA page `table[b, w]` of the layer straight
from the pools in HBM: one `[page, C]` latent and `[page, R]` rope block per step, no gathered
copy of the context. Past a row's last visible page the index map repeats that page, which
Pallas does not fetch again, and the step skips its matmuls; the online softmax (running max,
normaliser, float32 `[bq, C]` output) lives in VMEM scratch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention import layout, online_softmax


def _kernel(table_ref, layer_ref, len_ref, q_ref, qpe_ref, qp_ref, ckv_ref, kpe_ref, out_ref,
            m_ref, l_ref, acc_ref, *, scale: float, width: int, num_pages: int):
    """Refs `q [bq, C]`, `qpe [bq, R]`, `qp [bq, 1]`, `ckv [page, C]`, `kpe [page, R]`,
    `out [bq, C]`; scratch `m`, `l` `[bq, 1]`, `acc [bq, C]` float32."""
    del layer_ref
    b, w = pl.program_id(0), pl.program_id(2)
    page_size = ckv_ref.shape[0]

    @pl.when(w == 0)
    def _init():
        m_ref[...], l_ref[...], acc_ref[...] = online_softmax.initial(*acc_ref.shape)

    @pl.when((w * page_size < len_ref[b]) & (table_ref[b * width + w] < num_pages))
    def _update():
        q = q_ref[...]
        ckv = ckv_ref[...].astype(q.dtype)
        dims = (((1,), (1,)), ((), ()))
        scores = (jax.lax.dot_general(q, ckv, dims, preferred_element_type=jnp.float32) +
                  jax.lax.dot_general(qpe_ref[...], kpe_ref[...].astype(q.dtype), dims,
                                      preferred_element_type=jnp.float32)) * scale
        kv_pos = w * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
        m_ref[...], l_ref[...], acc_ref[...] = online_softmax.update(
            m_ref[...], l_ref[...], acc_ref[...], scores, kv_pos <= qp_ref[...], ckv)

    @pl.when(w == pl.num_programs(2) - 1)
    def _store():
        out_ref[...] = online_softmax.finish(l_ref[...], acc_ref[...], out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "interpret"))
def attention(q_latent_btnc, q_pe_btnr, ckv_lpsc, kpe_lpsr, page_table_bw, layer, q_pos_bt, *,
              scale: float, block_q: int = 128, interpret: bool = False):
    """`paged.reference`'s contract."""
    a, block_q = layout.prepare_paged(q_latent_btnc, q_pe_btnr, page_table_bw, layer, q_pos_bt,
                                      block_q=block_q, pow2_rows=False)
    b, rows, c = a.q_latent_brc.shape
    r = a.q_pe_brr.shape[-1]
    num_pages, page_size = ckv_lpsc.shape[1:3]
    width = page_table_bw.shape[1]

    def page_block(b, i, w, table, layer, lens):
        # Past the row's last visible page, stay on it: an unchanged block is not re-fetched.
        last = jnp.maximum(lens[b] - 1, 0) // page_size
        page = table[b * width + jnp.minimum(w, last)]
        return layer[0], jnp.minimum(page, num_pages - 1), 0, 0

    def rows_block(b, i, w, *_):
        return b, i, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, rows // block_q, width),
        in_specs=[
            pl.BlockSpec((None, block_q, c), rows_block),
            pl.BlockSpec((None, block_q, r), rows_block),
            pl.BlockSpec((None, block_q, 1), rows_block),
            pl.BlockSpec((None, None, page_size, c), page_block),
            pl.BlockSpec((None, None, page_size, r), page_block),
        ],
        out_specs=pl.BlockSpec((None, block_q, c), rows_block),
        scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, c), jnp.float32)])
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, width=width, num_pages=num_pages),
        out_shape=jax.ShapeDtypeStruct((b, rows, c), q_latent_btnc.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="paged_latent_attention",
    )(a.table_flat, a.layer, a.kv_len_b, a.q_latent_brc, a.q_pe_brr, a.q_pos_br1, ckv_lpsc,
      kpe_lpsr)
    return layout.finish_paged(out, a)
