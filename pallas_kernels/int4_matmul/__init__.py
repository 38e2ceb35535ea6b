"""INT4 dequant matmul `x [M, K] @ W [K, N]`: `int4_matmul(x, values, scale, impl=...)`."""

from pallas_kernels.int4_matmul.api import int4_matmul

__all__ = ["int4_matmul"]
