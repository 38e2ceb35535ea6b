"""Causal attention by positions and segments, `attention(q, k, v, ...)`: the plain reference,
a blockwise online-softmax version whose memory grows with T x block, not T x S, and Pallas
kernels for GPU and TPU; `latent_attention` and `paged_latent_attention` for absorbed MLA over a
contiguous and a paged latent cache."""

from pallas_kernels.attention.api import attention
from pallas_kernels.attention.paged import latent_attention, paged_latent_attention

__all__ = ["attention", "latent_attention", "paged_latent_attention"]
