"""Grouped INT4 matmul: both Pallas kernels (interpret mode) against the XLA reference on ragged
groups (empty experts, tiles straddling boundaries, rows past the sum), and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import PLATFORMS, assert_close_bf16, dense_weight, random_int4, random_x
from pallas_kernels.grouped_int4_matmul import grouped_int4_matmul, pallas_tpu, pallas_triton
from pallas_kernels.grouped_int4_matmul import reference

K, N = 128, 256
TRITON = pallas_triton.Config(16, 128, 64)
TPU = pallas_tpu.Config(16, 128, 128)
GROUP_SIZES = [
    [7, 0, 20, 0, 6],         # empty experts, straddled tiles, 7 rows past the sum
    [0, 0, 40, 0, 0],         # one expert takes everything
    [1, 1, 1, 1, 1],          # decode-like: many experts in one tile, 35 rows past the sum
    [0, 0, 0, 0, 0],          # nothing routed: all zeros
]


def _inputs(seed, sizes, m=40):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = random_x(kx, (m, K))
    # Rows past the sum are not read: poison them.
    x = jnp.where((jnp.arange(m) < sum(sizes))[:, None], x, jnp.nan)
    values, scale = random_int4(kw, (len(sizes), K, N))
    return x, values, scale, jnp.array(sizes, jnp.int32)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("sizes", GROUP_SIZES)
def test_kernel_matches_reference(platform, sizes):
    x, values, scale, group_sizes = _inputs(len(sizes) + sum(sizes), sizes)
    got = grouped_int4_matmul(x, values, scale, group_sizes, impl="pallas", platform=platform,
                              interpret=True, config=TRITON if platform == "gpu" else TPU)
    want = reference.grouped_int4_matmul(x, values, scale, group_sizes)
    assert_close_bf16(got, want)
    assert not np.asarray(got[sum(sizes):], np.float32).any(), "rows past the sum must be 0"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_default_config_on_random_routing(platform):
    # Sum below M, sizes drawn like a router's load, default block sizes.
    sizes = np.random.default_rng(3).multinomial(50, np.ones(6) / 6).tolist()
    sizes[2] = 0
    x, values, scale, group_sizes = _inputs(9, sizes, m=64)
    got = grouped_int4_matmul(x, values, scale, group_sizes, impl="pallas", platform=platform,
                              interpret=True)
    assert_close_bf16(got, reference.grouped_int4_matmul(x, values, scale, group_sizes))


def test_reference_is_per_row_expert_product_and_auto_uses_it_on_cpu():
    sizes = [3, 0, 5, 2]
    x, values, scale, group_sizes = _inputs(4, sizes, m=12)
    experts = np.repeat(np.arange(4), sizes)
    w = dense_weight(values, scale)
    x32 = np.asarray(x, np.float32)
    want = np.zeros((12, N), np.float32)
    want[:10] = np.einsum("mk,mkn->mn", x32[:10], w[experts])
    got = reference.grouped_int4_matmul(x, values, scale, group_sizes)
    assert_close_bf16(got, want)
    np.testing.assert_array_equal(grouped_int4_matmul(x, values, scale, group_sizes), got)


@pytest.mark.parametrize("impl,platform", [("reference", None), ("pallas", "gpu"),
                                           ("pallas", "tpu")])
def test_gradient_in_x_is_the_dense_formula(impl, platform):
    sizes = [3, 0, 4]
    kx, kw, kc = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(kx, (9, K), jnp.float32)
    values, scale = random_int4(kw, (3, K, N))
    cotangent = jax.random.normal(kc, (9, N), jnp.float32)
    group_sizes = jnp.array(sizes, jnp.int32)
    config = {"gpu": TRITON, "tpu": TPU}.get(platform)

    def loss(x):
        y = grouped_int4_matmul(x, values, scale, group_sizes, impl=impl, platform=platform,
                                interpret=impl == "pallas", config=config)
        return jnp.sum(y * cotangent)

    w = dense_weight(values, scale)
    experts = np.repeat(np.arange(3), sizes)
    want = np.zeros((9, K), np.float32)
    want[:7] = np.einsum("mn,mkn->mk", np.asarray(cotangent)[:7], w[experts])
    np.testing.assert_allclose(jax.grad(loss)(x), want, rtol=1e-4, atol=1e-4)
