"""Causal attention by positions and segments, `attention(q, k, v, ...)`: the plain reference and
a blockwise online-softmax version whose memory grows with T x block, not T x S."""

from pallas_kernels.attention.api import attention

__all__ = ["attention"]
