"""Grouped (per-expert) INT4 matmul: `grouped_int4_matmul(x, values, scale, group_sizes)`."""

from pallas_kernels.grouped_int4_matmul.api import grouped_int4_matmul

__all__ = ["grouped_int4_matmul"]
