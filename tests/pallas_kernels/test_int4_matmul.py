"""INT4 dequant matmul: both Pallas kernels (interpret mode) against the XLA reference,
decode and prefill block choices, and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import PLATFORMS, assert_close_bf16, dense_weight, random_int4, random_x
from pallas_kernels.int4_matmul import int4_matmul, pallas_tpu, pallas_triton, reference

# (M, K, N, Triton config, TPU config); None = the default chosen from M.
CASES = [
    (1, 256, 128, None, None),                                            # decode, split K
    (13, 512, 256, pallas_triton.Config(16, 64, 64, k_splits=2),          # rows past M masked
     pallas_tpu.Config(13, 128, 512)),
    (130, 256, 256, pallas_triton.Config(64, 128, 64),                    # prefill, edge block
     pallas_tpu.Config(64, 128, 256)),
]


def _config(platform, triton_cfg, tpu_cfg):
    return triton_cfg if platform == "gpu" else tpu_cfg


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("m,k,n,triton_cfg,tpu_cfg", CASES)
def test_kernel_matches_reference(platform, m, k, n, triton_cfg, tpu_cfg):
    kx, kw = jax.random.split(jax.random.key(m * 7 + k))
    x = random_x(kx, (m, k))
    values, scale = random_int4(kw, (k, n))
    got = int4_matmul(x, values, scale, impl="pallas", platform=platform, interpret=True,
                      config=_config(platform, triton_cfg, tpu_cfg))
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    assert_close_bf16(got, reference.int4_matmul(x, values, scale))


def test_reference_is_the_dense_product_and_auto_uses_it_on_cpu():
    kx, kw = jax.random.split(jax.random.key(0))
    x = random_x(kx, (5, 128))
    values, scale = random_int4(kw, (128, 64))
    want = np.asarray(x, np.float32) @ dense_weight(values, scale)
    got = reference.int4_matmul(x, values, scale)
    assert_close_bf16(got, want)
    np.testing.assert_array_equal(int4_matmul(x, values, scale), got)


@pytest.mark.parametrize("m", [1, 8, 64, 512, 4096])
@pytest.mark.parametrize("k,n", [(7168, 2048), (2048, 7168)])
def test_default_configs_tile_k2_shapes(m, k, n):
    cfg = pallas_triton.default_config(m, k, n)
    for block in (cfg.block_m, cfg.block_n, cfg.block_k, cfg.k_splits):
        assert block & (block - 1) == 0, f"Triton block {block} is not a power of two"
    assert cfg.block_m >= min(16, m) and k % (cfg.block_k * cfg.k_splits) == 0
    assert (cfg.k_splits > 1) == (m <= 64), "decode splits K, prefill does not"
    cfg = pallas_tpu.default_config(m, k, n)
    assert n % cfg.block_n == 0 and cfg.block_n % 128 == 0
    assert k % cfg.block_k == 0 and (cfg.block_k // 32) % 16 == 0
    assert cfg.block_m == m if m <= 64 else cfg.block_m % 16 == 0


def _loss(fn, cotangent):
    return lambda x, scale: jnp.sum(fn(x, scale).astype(jnp.float32) * cotangent)


def test_reference_gradient_is_the_dense_formula():
    kx, kw, kc = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (6, 64), jnp.float32)
    values, scale = random_int4(kw, (64, 32))
    scale = scale.astype(jnp.float32)
    cotangent = jax.random.normal(kc, (6, 32), jnp.float32)
    dx, dscale = jax.grad(_loss(lambda x, s: reference.int4_matmul(x, values, s), cotangent),
                          argnums=(0, 1))(x, scale)
    w = dense_weight(values, scale)
    np.testing.assert_allclose(dx, cotangent @ w.T, rtol=1e-5, atol=1e-5)
    # d/dscale[g, n] = sum over the group's rows of values * (x^T ct).
    dw = np.asarray(x).T @ np.asarray(cotangent)
    want = (dw * np.asarray(values).astype(np.float32)).reshape(2, 32, 32).sum(1)
    np.testing.assert_allclose(dscale, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_kernel_gradient_is_the_reference_gradient(platform):
    kx, kw, kc = jax.random.split(jax.random.key(2), 3)
    x = random_x(kx, (4, 128))
    values, scale = random_int4(kw, (128, 128))
    cotangent = jax.random.normal(kc, (4, 128), jnp.float32)
    kernel = lambda x, s: int4_matmul(x, values, s, impl="pallas", platform=platform,
                                      interpret=True)
    got = jax.grad(_loss(kernel, cotangent), argnums=(0, 1))(x, scale)
    want = jax.grad(_loss(lambda x, s: reference.int4_matmul(x, values, s), cotangent),
                    argnums=(0, 1))(x, scale)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
