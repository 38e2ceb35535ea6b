"""Entry point of attention: blockwise (online softmax) by default, the plain reference on
request. Pallas kernels for GPU and TPU are to come behind the same call."""

from __future__ import annotations

from pallas_kernels.attention import blockwise, reference

IMPLS = ("auto", "blockwise", "reference")


def attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt=None, kv_seg_bs=None, *,
              scale: float, impl: str = "auto", block: int = 512):
    """Causal attention by positions (and segments): `[B, T, N, U]` in v's dtype.

    Args:
      q_btnk: queries `[B, T, N, K]`.
      k_bsgk, v_bsgu: keys `[B, S, G, K]` and values `[B, S, G, U]`, G dividing N (G = N:
        multi-head; G = 1: one key and value for every head).
      q_pos_bt, kv_pos_bs: int32 positions; key s is visible to query t iff
        `kv_pos[s] <= q_pos[t]`.
      q_seg_bt, kv_seg_bs: optional segment ids; keys of other segments are not visible.
      scale: multiplies the scores (softmax scale).
      impl: "auto" or "blockwise" (memory O(T x block)), "reference" (the `[T, S]` scores).
      block: keys per block of the blockwise version.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if k_bsgk.shape[2] == 0 or q_btnk.shape[2] % k_bsgk.shape[2]:
        raise ValueError(f"{q_btnk.shape[2]} query heads do not split over "
                         f"{k_bsgk.shape[2]} key heads")
    if impl == "reference":
        return reference.attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt,
                                   kv_seg_bs, scale=scale)
    return blockwise.attention(q_btnk, k_bsgk, v_bsgu, q_pos_bt, kv_pos_bs, q_seg_bt, kv_seg_bs,
                               scale=scale, block=block)
