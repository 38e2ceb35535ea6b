"""Grouped (per-expert) matmul `x [M, K]` sorted by expert times `W [E, K, N]`, float or INT4."""

from pallas_kernels.grouped_matmul.api import choose, expert_swiglu, grouped_matmul

__all__ = ["choose", "expert_swiglu", "grouped_matmul"]
