"""Rotary position embedding with YaRN scaling, in DeepSeek's interleaved-pair layout.

The rope dimensions of q and k come as interleaved pairs `(x0, x1), (x2, x3), ...`, each pair
rotated by one frequency. The output puts the rotated evens first and the rotated odds second
(as HF does); q and k get the same permutation, so their dot products are unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.config import ModelConfig, yarn_mscale


def inverse_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Returns `(inv_freq [R/2] float32, attention_factor)` for the config's rope."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_extrapolation = (1.0 / pos_freqs).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_extrapolation, 1.0
    inv_interpolation = (1.0 / (rs.factor * pos_freqs)).astype(np.float32)

    def correction_dim(rotations):
        return (dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi))
                / (2 * math.log(base)))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp needs a non-empty interval
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    inv_freq = (inv_interpolation * (1 - extrapolation_weight)
                + inv_extrapolation * extrapolation_weight).astype(np.float32)
    if rs.mscale and rs.mscale_all_dim:
        attention_factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor,
                                                                           rs.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(rs.factor)
    return inv_freq, float(attention_factor)


def cos_sin(config: ModelConfig, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B, T, R/2]` (float32, YaRN attention factor applied) at `positions`."""
    inv_freq, attention_factor = inverse_frequencies(config)
    angles = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rotary(x_btnr: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array) -> jax.Array:
    """Rotates interleaved pairs of `x [B, T, N, R]`; returns `[rotated evens, rotated odds]`."""
    dtype = x_btnr.dtype
    cos = cos_btr[:, :, None, :].astype(dtype)
    sin = sin_btr[:, :, None, :].astype(dtype)
    even, odd = x_btnr[..., 0::2], x_btnr[..., 1::2]
    return jnp.concatenate([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
