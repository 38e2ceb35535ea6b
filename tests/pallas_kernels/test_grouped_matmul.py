"""The grouped matmul op: every implementation (XLA reference, CPU tile loop, both Pallas kernels
in interpret mode) gives the same values and gradients, float and INT4; the kernels against the
reference on ragged groups (empty experts, tiles straddling boundaries, rows past the sum)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import PLATFORMS, assert_close_bf16, dense_weight, random_int4, random_x
from pallas_kernels.grouped_matmul import choose, grouped_matmul, pallas_tpu, pallas_triton
from pallas_kernels.grouped_matmul import reference
from pallas_kernels.quantized import QuantizedWeight

K, N = 128, 256
TRITON = pallas_triton.Config(16, 128, 64)
TPU = pallas_tpu.Config(16, 128, 128)
GROUP_SIZES = [
    [7, 0, 20, 0, 6],         # empty experts, straddled tiles, 7 rows past the sum
    [0, 0, 40, 0, 0],         # one expert takes everything
    [1, 1, 1, 1, 1],          # decode-like: many experts in one tile, 35 rows past the sum
    [0, 0, 0, 0, 0],          # nothing routed: all zeros
]


def grouped_int4_matmul(x, values, scale, group_sizes, **options):
    return grouped_matmul(x, QuantizedWeight(values, scale), group_sizes, **options)


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


def test_reference_is_per_row_expert_product():
    sizes = [3, 0, 5, 2]
    x, values, scale, group_sizes = _inputs(4, sizes, m=12)
    experts = np.repeat(np.arange(4), sizes)
    w = dense_weight(values, scale)
    x32 = np.asarray(x, np.float32)
    want = np.zeros((12, N), np.float32)
    want[:10] = np.einsum("mk,mkn->mn", x32[:10], w[experts])
    got = reference.grouped_int4_matmul(x, values, scale, group_sizes)
    assert_close_bf16(got, want)


def test_choice_by_backend_and_weight():
    qw = QuantizedWeight(jnp.zeros((2, 32, 8), jnp.int4), jnp.ones((2, 1, 8), jnp.bfloat16))
    w = jnp.zeros((2, 32, 8))
    assert choose(qw) == choose(w) == "tiled"  # this machine: XLA:CPU
    assert choose(qw, platform="gpu") == "triton" and choose(qw, platform="tpu") == "tpu"
    assert choose(w, platform="gpu") == choose(w, platform="tpu") == "reference"
    assert choose(qw, "reference", platform="gpu") == "reference"
    with pytest.raises(ValueError, match="INT4"):
        choose(w, "pallas", platform="gpu")
    with pytest.raises(ValueError, match="impl"):
        choose(w, "fast")


IMPLEMENTATIONS = {"reference": dict(impl="reference"), "tiled": dict(impl="tiled"),
                   "triton": dict(impl="pallas", platform="gpu", interpret=True, config=TRITON),
                   "tpu": dict(impl="pallas", platform="tpu", interpret=True, config=TPU)}


@pytest.mark.parametrize("weights", ["float", "int4"])
def test_every_implementation_gives_the_same_values_and_gradients(weights):
    """float32 throughout, so the implementations agree to float32 rounding; the gradient is in
    x and in the weight (float) or its scale (INT4: values are integers)."""
    sizes = [5, 0, 9, 1, 0]
    kx, kw, kc = jax.random.split(jax.random.key(11), 3)
    x = jax.random.normal(kx, (20, K), jnp.float32)  # 5 rows past the sum
    values, scale = random_int4(kw, (len(sizes), K, N))
    scale = scale.astype(jnp.float32)
    dense = jnp.asarray(dense_weight(values, scale))
    cotangent = jax.random.normal(kc, (20, N), jnp.float32)
    group_sizes = jnp.array(sizes, jnp.int32)
    names = list(IMPLEMENTATIONS) if weights == "int4" else ["reference", "tiled"]

    def run(name):
        options = IMPLEMENTATIONS[name]

        def loss(x, w):
            weight = QuantizedWeight(values, w) if weights == "int4" else w
            y = grouped_matmul(x, weight, group_sizes, jnp.float32, **options)
            return jnp.sum(y * cotangent), y

        w = scale if weights == "int4" else dense
        (_, y), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w)
        return [np.asarray(a) for a in (y, *grads)]

    want_y, want_dx, want_dw = run("reference")
    assert not want_y[sum(sizes):].any() and not want_dx[sum(sizes):].any()
    for name in names[1:]:
        y, dx, dw = run(name)
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-3, err_msg=name)


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
