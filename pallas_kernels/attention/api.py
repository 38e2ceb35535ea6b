"""Entry point of attention: the Pallas kernel on GPU (Triton) and TPU (Mosaic), the XLA
blockwise version on CPU, the plain reference on request.

The kernels compute the forward; their gradient is the blockwise version's (recomputed block by
block from the same inputs), so training on any backend keeps memory linear in T.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.attention import blockwise, pallas_tpu, pallas_triton, reference

IMPLS = ("auto", "blockwise", "reference", "pallas")


def _partitioned_by_xla() -> bool:
    """Whether this trace runs under a multi-device mesh that XLA partitions (outside
    `shard_map`): a Pallas call there would be fed whole, gathered arrays, so "auto" keeps
    the blockwise version, which XLA splits like any other op."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1 and any(
        t != jax.sharding.AxisType.Manual for t in mesh.axis_types)


def attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt=None, kv_seg_bs=None, *,
              scale: float, impl: str = "auto", block: int = 512, platform: str | None = None,
              interpret: bool = False):
    """Causal attention by positions (and segments): `[B, T, N, U]` in v's dtype.

    Args:
      q_btnk: queries `[B, T, N, K]`.
      k_bsgk, v_bsgu: keys `[B, S, G, K]` and values `[B, S, G, U]`, G dividing N (G = N:
        multi-head; G = 1: one key and value for every head).
      q_pos_bt, kv_pos_bs: int32 positions; key s is visible to query t iff
        `kv_pos[s] <= q_pos[t]`.
      q_seg_bt, kv_seg_bs: optional segment ids; keys of other segments are not visible.
      scale: multiplies the scores (softmax scale).
      impl: "auto" (Pallas on GPU/TPU, blockwise elsewhere and under a mesh that XLA
        partitions), "blockwise" (XLA, memory
        O(T x block)), "reference" (the `[T, S]` scores) or "pallas".
      block: keys per block of the blockwise version.
      platform, interpret: which Pallas kernel ("gpu" or "tpu"; default the backend) and
        whether to run it in interpret mode (tests on CPU).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if k_bsgk.shape[2] == 0 or q_btnk.shape[2] % k_bsgk.shape[2]:
        raise ValueError(f"{q_btnk.shape[2]} query heads do not split over "
                         f"{k_bsgk.shape[2]} key heads")
    if impl == "reference":
        return reference.attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt,
                                   kv_seg_bs, scale=scale)
    chosen = "reference" if impl == "blockwise" or (
        impl == "auto" and _partitioned_by_xla()) else common.resolve(
        "pallas" if impl == "pallas" else "auto", platform, interpret)
    blocks = functools.partial(blockwise.attention, scale=scale, block=block)
    if chosen == "reference":  # no kernel here: the XLA blockwise version
        return blocks(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs)
    if q_seg_bt is None:
        q_seg_bt, kv_seg_bs = jnp.zeros_like(q_pos_bt), jnp.zeros_like(kv_pos_bs)
    backend = pallas_triton if chosen == "triton" else pallas_tpu
    kernel = functools.partial(backend.attention, scale=scale, interpret=interpret)
    return common.with_reference_vjp(kernel, blocks)(
        q_btnk, k_bsgk, v_bsgu, q_pos_bt.astype(jnp.int32), kv_pos_bs.astype(jnp.int32),
        q_seg_bt.astype(jnp.int32), kv_seg_bs.astype(jnp.int32))
