"""Absorbed-MLA attention read straight from a paged latent cache.

Absorbed MLA keeps one latent per token, `ckv [C]` and the rotated `kpe [R]`, shared by every
head: the key is `[ckv, kpe]` and the value `ckv`. A cache holds them in pages, pools
`[L, P, page, C]` and `[L, P, page, R]`, and a page table `[B, W]` says which page holds
positions `[w * page, (w + 1) * page)` of row b (ids >= P: unallocated). Key position s of a row
is visible to query t iff the page is allocated and `s <= q_pos[t]`.

`paged_latent_attention` is the entry point: the Pallas kernels on GPU and TPU read the pages
where they lie, one page per step, through the table (no copy of the context); the XLA version
gathers the row's pages (`gather_pages`) and runs the blockwise attention over them, as
`latent_attention` does over a contiguous cache. Forward
only: it serves cached decode and prefill, which take no gradient.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.attention import api, layout, paged_tpu, paged_triton

IMPLS = ("auto", "reference", "pallas")


def gather_pages(pages_lpsx, page_table_bw, layer):
    """One layer's pages of every row laid end to end: `[B, W x page, X]`, unallocated pages
    zeros."""
    num_pages, page_size = pages_lpsx.shape[1:3]
    batch, width = page_table_bw.shape
    allocated_bw11 = (page_table_bw < num_pages)[..., None, None]
    table_bw = jnp.minimum(page_table_bw, num_pages - 1)
    # One clipped gather along the flattened (layer, page) axis: indexing both axes makes
    # XLA:CPU copy the whole pool (written in place by the layer) on every call.
    flat = pages_lpsx.reshape(-1, *pages_lpsx.shape[2:])
    rows = jnp.where(allocated_bw11, jnp.take(flat, layer * num_pages + table_bw, axis=0,
                                              mode="clip"), 0)
    return rows.reshape(batch, width * page_size, pages_lpsx.shape[-1])


def key_positions(page_table_bw, num_pages: int, page_size: int):
    """`[B, W x page]` position of every gathered slot; `layout.NEVER` (seen by no query) in
    unallocated pages."""
    batch, width = page_table_bw.shape
    pos_bs = jnp.broadcast_to(jnp.arange(width * page_size, dtype=jnp.int32),
                              (batch, width * page_size))
    allocated_bs = jnp.repeat(page_table_bw < num_pages, page_size, axis=1)
    return jnp.where(allocated_bs, pos_bs, layout.NEVER)


def latent_attention(q_latent_btnc, q_pe_btnr, ckv_bsc, kpe_bsr, q_pos_bt, kv_pos_bs, *,
                     scale: float, impl: str = "auto"):
    """Absorbed MLA over contiguous latents: one key `[C + R]` and value `[C]` per token shared
    by all heads (G = 1), through `api.attention` (never a `[T, S]` score matrix for the whole
    context). `[B, T, N, C]` in the queries' dtype."""
    dtype = q_latent_btnc.dtype
    ckv, kpe = ckv_bsc.astype(dtype), kpe_bsr.astype(dtype)
    q_btnk = jnp.concatenate([q_latent_btnc, q_pe_btnr], axis=-1)
    k_bs1k = jnp.concatenate([ckv, kpe], axis=-1)[:, :, None, :]
    return api.attention(q_btnk, k_bs1k, ckv[:, :, None, :], q_pos_bt, kv_pos_bs, scale=scale,
                         impl=impl)


def reference(q_latent_btnc, q_pe_btnr, ckv_lpsc, kpe_lpsr, page_table_bw, layer, q_pos_bt, *,
              scale: float):
    """XLA: the pages gathered, then the blockwise attention with one shared key."""
    return latent_attention(
        q_latent_btnc, q_pe_btnr, gather_pages(ckv_lpsc, page_table_bw, layer),
        gather_pages(kpe_lpsr, page_table_bw, layer),
        q_pos_bt, key_positions(page_table_bw, *ckv_lpsc.shape[1:3]), scale=scale,
        impl="blockwise")


def paged_latent_attention(q_latent_btnc, q_pe_btnr, ckv_lpsc, kpe_lpsr, page_table_bw, layer,
                           q_pos_bt, *, scale: float, impl: str = "auto",
                           platform: str | None = None, interpret: bool = False):
    """`[B, T, N, C]` in the queries' dtype.

    Args:
      q_latent_btnc: queries in latent space (`q_nope` through `kv_b_proj`'s key half).
      q_pe_btnr: rotated rope queries.
      ckv_lpsc, kpe_lpsr: the stack's pools (any float dtype; cast to the queries').
      page_table_bw: int32 page ids per row; ids >= P are unallocated.
      layer: int32 scalar, the pools' layer.
      q_pos_bt: int32 query positions, -1 for padding (sees nothing, gives zeros).
      scale: softmax scale.
      impl: "auto" (Pallas on GPU/TPU, XLA elsewhere), "reference" or "pallas".
      platform, interpret: as `pallas_kernels.attention.attention`.
    """
    if impl not in IMPLS:
        raise ValueError(f"paged attention impl must be one of {IMPLS}, got {impl!r}")
    c, r = ckv_lpsc.shape[-1], kpe_lpsr.shape[-1]
    if q_latent_btnc.shape[-1] != c or q_pe_btnr.shape[-1] != r:
        raise ValueError(f"queries [.., {q_latent_btnc.shape[-1]}] + [.., {q_pe_btnr.shape[-1]}]"
                         f" do not match the pages' latent {c} + rope {r} dims")
    chosen = common.resolve(impl, platform, interpret)
    dims = (c, r, ckv_lpsc.shape[2])
    if chosen == "triton" and not interpret and any(d != layout.next_pow2(d) for d in dims):
        if impl == "pallas":  # Triton blocks are powers of two, and the pools are not padded
            raise ValueError(f"the Triton paged kernel needs power-of-two latent, rope and page "
                             f"sizes, got {dims}")
        chosen = "reference"
    if chosen == "reference":
        return reference(q_latent_btnc, q_pe_btnr, ckv_lpsc, kpe_lpsr, page_table_bw, layer,
                         q_pos_bt, scale=scale)
    kernel = paged_triton if chosen == "triton" else paged_tpu
    return kernel.attention(q_latent_btnc, q_pe_btnr, ckv_lpsc, kpe_lpsr, page_table_bw,
                            jnp.asarray(layer, jnp.int32), q_pos_bt, scale=scale,
                            interpret=interpret)
