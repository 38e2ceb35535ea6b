"""The named transforms of conversion, on numpy arrays, built for throughput.

    transpose(x [a, b]) -> [b, a]                 hub [out, in] <-> k2jax [in, out]
    dequantize_fp8(w [out, in] e4m3, scale_inv [ceil(out/bo), ceil(in/bi)]) -> f32 [out, in]
    unpack_int4(packed int32 [out, in/8], scale [out, in/g], (out, in)) -> QuantizedWeight [in, out]
    pack_int4(QuantizedWeight [in, out]) -> {weight_packed, weight_scale, weight_shape}

`unpack_int4`/`pack_int4` give bit for bit what `k2jax.quant.unpack_compressed_tensors` /
`pack_compressed_tensors` give (tests hold them to it) for one linear, about 10x faster: they
transpose the packed bytes (half a byte per value) instead of the unpacked values and split
nibbles with whole-array shifts. A full K2 Thinking conversion unpacks 10^12 values, so this is
the difference between hours and minutes of CPU. numpy's strided copy is slow for large
transposes, so `transpose` copies cache-sized tiles. Assumes a little-endian host, as the
safetensors byte order is.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from k2jax.quant import QuantizedWeight

_TILE = 256


def transpose(x: np.ndarray) -> np.ndarray:
    """`x [a, b]` -> a C-contiguous `[b, a]` copy, tile by tile."""
    x = np.asarray(x)
    bits = x.view(f"u{x.dtype.itemsize}")
    rows, cols = bits.shape
    out = np.empty((cols, rows), bits.dtype)
    for i in range(0, rows, _TILE):
        for j in range(0, cols, _TILE):
            out[j:j + _TILE, i:i + _TILE] = bits[i:i + _TILE, j:j + _TILE].T
    return out.view(x.dtype)


def dequantize_fp8(w_oi: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float8 `[out, in]` times its per-block `scale_inv` -> float32 `[out, in]`."""
    dout, din = w_oi.shape
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], 0)[:dout], block[1], 1)
    return w_oi.astype(np.float32) * scale[:, :din]


def unpack_int4(packed: np.ndarray, scale: np.ndarray, shape) -> QuantizedWeight:
    """compressed-tensors pack-quantized tensors of one linear -> `QuantizedWeight`
    (values int4 `[in, out]`, scale `[in/g, out]` in its stored dtype)."""
    dout, din = (int(d) for d in np.asarray(shape).reshape(-1))
    if packed.dtype != np.int32 or din % 8 or packed.shape != (dout, din // 8):
        raise ValueError(f"weight_packed {packed.dtype}{list(packed.shape)} does not hold "
                         f"weight_shape {[dout, din]} as int32 words of 8 nibbles")
    # Byte k of the little-endian words holds element 2k in its low nibble and 2k+1 in its
    # high one, each as value + 8; an int4 numpy array stores value v as the byte v & 0xF,
    # which is nibble ^ 8.
    bytes_t = transpose(packed.view(np.uint8))  # [in/2, out]
    values = np.empty((din // 2, 2, dout), np.uint8)
    low, high = values[:, 0], values[:, 1]
    np.bitwise_and(bytes_t, 0xF, out=low)
    np.right_shift(bytes_t, 4, out=high)
    low ^= 8
    high ^= 8
    return QuantizedWeight(values.reshape(din, dout).view(ml_dtypes.int4), transpose(scale))


def pack_int4(qw: QuantizedWeight) -> dict[str, np.ndarray]:
    """Inverse of `unpack_int4`: `weight_packed` int32 `[out, in/8]`, `weight_scale` bf16
    `[out, in/g]`, `weight_shape` int64 `[2]` (compressed-tensors writes the shape as int64)."""
    values = np.asarray(qw.values)
    din, dout = values.shape
    nibbles = ((values.view(np.uint8) & 0xF) ^ 8).reshape(din // 2, 2, dout)
    bytes_t = nibbles[:, 0] | (nibbles[:, 1] << 4)  # [in/2, out]
    return {"weight_packed": transpose(bytes_t).view(np.int32),
            "weight_scale": transpose(np.asarray(qw.scale).astype(ml_dtypes.bfloat16)),
            "weight_shape": np.array([dout, din], np.int64)}
