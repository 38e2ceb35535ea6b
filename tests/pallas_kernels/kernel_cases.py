"""Shared helpers of the kernel tests: random INT4 weights and the bf16 comparison."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Both Pallas kernels of every op run in interpret mode on CPU.
PLATFORMS = ("gpu", "tpu")


# Jitted so that each helper compiles once per shape instead of op by op.
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def random_int4(key, shape_kn, group=32, scale=0.05):
    """int4 values `[..., K, N]` over the full range [-8, 7] and bf16 scales `[..., K/g, N]`."""
    k_values, k_scale = jax.random.split(key)
    values = jax.random.randint(k_values, shape_kn, -8, 8).astype(jnp.int4)
    *lead, k, n = shape_kn
    scales = jax.random.uniform(k_scale, (*lead, k // group, n), minval=0.5, maxval=1.5) * scale
    return values, scales.astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnums=1)
def random_x(key, shape):
    return jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)


def dense_weight(values, scale):
    """The dequantized weight in float32, written out independently of the code under test."""
    v = np.asarray(values).astype(np.float32)
    s = np.repeat(np.asarray(scale).astype(np.float32), v.shape[-2] // scale.shape[-2], axis=-2)
    return v * s


def assert_close_bf16(got, want):
    """bf16 results of f32-accumulated dots in different orders: within 1% of the scale, and
    every element written (interpret mode leaves unwritten float outputs NaN)."""
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    assert np.isfinite(got).all(), "kernel left elements unwritten (NaN)"
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * max(np.abs(want).max(), 1e-3))
