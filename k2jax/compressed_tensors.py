"""compressed-tensors `pack-quantized` INT4 on the host, bit-exact both ways.

    unpack(weight_packed int32 [..., out, in/8], weight_scale [..., out, in/g], [out, in])
        -> QuantizedWeight(values int4 [..., in, out], scale [..., in/g, out])
    pack(QuantizedWeight) -> {weight_packed, weight_scale bf16, weight_shape int64 [2]}

In a word, element i sits at bits 4i..4i+3 as the nibble `value + 8`. Both directions work on
bytes, not on unpacked values: byte k of a little-endian word holds element 2k in its low
nibble and 2k+1 in its high one, and an int4 numpy array stores value v as the byte `v & 0xF`,
which is `nibble ^ 8`. So the transpose from the hub's `[out, in]` to k2jax's `[in, out]` moves
half a byte per value, and the nibbles split with whole-array shifts: a full K2 Thinking
conversion unpacks 10^12 values, and this is the difference between hours and minutes of CPU.
numpy's strided copy is slow for large transposes, so `transpose` copies cache-sized tiles.
Assumes a little-endian host, as the safetensors byte order is.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from k2jax.quant import QuantizedWeight

_TILE = 256
_NIBBLES_PER_WORD = 8


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


def _per_linear(fn, *arrays):
    """Applies a one-linear `fn` over the leading (stacked) dims of `arrays`."""
    lead = arrays[0].shape[:-2]
    if not lead:
        return fn(*arrays)
    parts = [fn(*(a[idx] for a in arrays)) for idx in np.ndindex(*lead)]
    return tuple(np.stack([p[i] for p in parts]).reshape(*lead, *parts[0][i].shape)
                 for i in range(len(parts[0])))


def _unpack_one(packed, scale):
    dout, words = packed.shape
    bytes_t = transpose(packed.view(np.uint8))  # [in/2, out]
    values = np.empty((words * 4, 2, dout), np.uint8)
    low, high = values[:, 0], values[:, 1]
    np.bitwise_and(bytes_t, 0xF, out=low)
    np.right_shift(bytes_t, 4, out=high)
    low ^= 8
    high ^= 8
    return values.reshape(words * _NIBBLES_PER_WORD, dout).view(ml_dtypes.int4), transpose(scale)


def unpack(weight_packed, weight_scale, weight_shape) -> QuantizedWeight:
    """Imports compressed-tensors tensors as a `QuantizedWeight` of numpy arrays.

    Args:
      weight_packed: int32 `[..., out, in/8]`.
      weight_scale: `[..., out, in/g]` (bf16 in K2 Thinking; kept in its dtype).
      weight_shape: `[2] = [out, in]` of one linear.
    """
    packed = np.asarray(weight_packed)
    dout, din = (int(d) for d in np.asarray(weight_shape).reshape(-1))
    if packed.dtype != np.int32 or din % _NIBBLES_PER_WORD or packed.shape[-2:] != (
            dout, din // _NIBBLES_PER_WORD):
        raise ValueError(f"weight_packed {packed.dtype}{list(packed.shape)} does not hold "
                         f"weight_shape {[dout, din]} as int32 words of 8 nibbles")
    values, scale = _per_linear(_unpack_one, packed, np.asarray(weight_scale))
    return QuantizedWeight(values, scale)


def _pack_one(values, scale):
    din, dout = values.shape
    nibbles = ((values.view(np.uint8) & 0xF) ^ 8).reshape(din // 2, 2, dout)
    bytes_t = nibbles[:, 0] | (nibbles[:, 1] << 4)  # [in/2, out]
    return transpose(bytes_t).view(np.int32), transpose(scale.astype(ml_dtypes.bfloat16))


def pack(qw: QuantizedWeight) -> dict[str, np.ndarray]:
    """Exports `qw` (values `[..., in, out]`): `weight_packed` int32 `[..., out, in/8]`,
    `weight_scale` bf16 `[..., out, in/g]`, `weight_shape` int64 `[2] = [out, in]` (the shape of
    one linear; int64 as compressed-tensors writes it)."""
    values = np.asarray(qw.values)
    if values.dtype != ml_dtypes.int4:
        values = values.astype(ml_dtypes.int4)
    din, dout = values.shape[-2:]
    if din % _NIBBLES_PER_WORD:
        raise ValueError(f"input dim {din} is not a multiple of {_NIBBLES_PER_WORD}")
    packed, scale = _per_linear(_pack_one, values, np.asarray(qw.scale))
    return {"weight_packed": packed, "weight_scale": scale,
            "weight_shape": np.array([dout, din], np.int64)}
