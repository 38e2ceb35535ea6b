"""FP8 block dequantization of K2 Instruct / DeepSeek-V3 weights, on numpy arrays.

    dequantize_fp8(w [out, in] e4m3, scale_inv [ceil(out/bo), ceil(in/bi)]) -> f32 [out, in]

The other transforms of conversion (tiled transpose, INT4 pack/unpack) are the host-side
format code of `k2jax.compressed_tensors`.
"""

from __future__ import annotations

import numpy as np


def dequantize_fp8(w_oi: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float8 `[out, in]` times its per-block `scale_inv` -> float32 `[out, in]`."""
    dout, din = w_oi.shape
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], 0)[:dout], block[1], 1)
    return w_oi.astype(np.float32) * scale[:, :din]
