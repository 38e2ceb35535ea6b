"""Grouped (per-expert) INT4 matmul `x [M, K]` sorted by expert times `W [E, K, N]`."""

from pallas_kernels.grouped_int4_matmul.api import grouped_int4_matmul

__all__ = ["grouped_int4_matmul"]
