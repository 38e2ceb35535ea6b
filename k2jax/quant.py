"""The INT4 weight format: `QuantizedWeight(values int4 [..., in, out], scale [..., in/g, out])`.

Symmetric, group `g` (32 for K2 Thinking) along the input dimension, `w = values * scale` per
group. Rounding is compressed-tensors': `scale = max|w| / 7.5`, `q = clip(round(w / scale), -8, 7)`.

The bit-exact conversion to and from compressed-tensors `pack-quantized` checkpoints lives in
`k2jax.compressed_tensors` (host-side numpy).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common as pallas_common
from pallas_kernels.int4_matmul import int4_matmul
from pallas_kernels.quantized import QuantizedWeight

__all__ = ["QuantizedWeight", "quantize", "dequantize", "fake_quantize", "matmul"]

INT4_MIN, INT4_MAX = -8, 7
# compressed-tensors divides the group's absmax by (qmax - qmin) / 2 = 7.5, not by 7 or 8.
_SCALE_DIVISOR = (INT4_MAX - INT4_MIN) / 2


@functools.partial(jax.jit, static_argnames=("group_size", "scale_dtype"))
def quantize(w: jax.Array, group_size: int = 32, scale_dtype=jnp.bfloat16) -> QuantizedWeight:
    """Round-to-nearest symmetric INT4 of `w [..., in, out]`, groups along `in`.

    For bf16 `w` (and the default bf16 scale) this reproduces compressed-tensors bit for bit:
    the scale is `absmax / 7.5` rounded to bf16, an all-zero group gets the scale dtype's eps,
    and `w / scale` is rounded to `w`'s dtype before `round` (half to even), as torch divides
    two bf16 tensors.
    """
    *lead, din, dout = w.shape
    if din % group_size:
        raise ValueError(f"input dim {din} of weight {tuple(w.shape)} is not a multiple of "
                         f"group_size={group_size}")
    w_grouped = w.astype(jnp.float32).reshape(*lead, din // group_size, group_size, dout)
    absmax = jnp.max(jnp.abs(w_grouped), axis=-2)
    # The scale is rounded to its storage dtype first and the values are computed against the
    # rounded scale, so dequantize(quantize(w)) is what an exported checkpoint reproduces.
    scale = (absmax / _SCALE_DIVISOR).astype(scale_dtype)
    scale = jnp.where(scale == 0, jnp.finfo(scale_dtype).eps, scale).astype(scale_dtype)
    quotient = (w_grouped / scale.astype(jnp.float32)[..., None, :]).astype(w.dtype)
    q = jnp.clip(jnp.round(quotient.astype(jnp.float32)), INT4_MIN, INT4_MAX)
    return QuantizedWeight(q.reshape(w.shape).astype(jnp.int4), scale)


def dequantize(qw: QuantizedWeight, dtype=jnp.bfloat16) -> jax.Array:
    """`values * scale` broadcast over each group: `[..., in, out]` in `dtype`."""
    return pallas_common.dequantize(qw.values, qw.scale, dtype)


def fake_quantize(w: jax.Array, group_size: int = 32) -> jax.Array:
    """Quantize-dequantize `w [..., in, out]` with a straight-through gradient (QAT).

    The forward value equals `dequantize(quantize(w))` exactly, so an export of the trained
    weights reproduces what training saw; the gradient passes through as if unquantized.
    """
    snapped = jax.lax.stop_gradient(dequantize(quantize(w, group_size), w.dtype))
    # `w - stop_gradient(w)` is exactly zero, so the value is bit-identical to `snapped`
    # (`w + (snapped - w)` would round) while the gradient is the identity.
    return snapped + (w - jax.lax.stop_gradient(w))


def matmul(x: jax.Array, w: jax.Array | QuantizedWeight, dtype) -> jax.Array:
    """`x[..., in] @ w[in, out]` in `dtype`; INT4 weights go through the int4 matmul kernel."""
    if isinstance(w, QuantizedWeight):
        lead = x.shape[:-1]
        y = int4_matmul(x.reshape(-1, x.shape[-1]).astype(dtype), w.values, w.scale)
        return y.reshape(*lead, w.shape[-1]).astype(dtype)
    return jnp.einsum("...i,io->...o", x, w.astype(dtype))
