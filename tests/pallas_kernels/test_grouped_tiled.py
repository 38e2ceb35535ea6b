"""The tiled grouped matmul (XLA:CPU expert path) against `lax.ragged_dot`: values and
gradients, ragged and empty groups, rows past the groups, tiles of every size, INT4 weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import quant
from pallas_kernels.grouped_matmul.tiled import (default_tile_rows, tile_schedule,
                                                 tiled_expert_swiglu, tiled_grouped_matmul)

E, K, N, M = 5, 64, 96, 23
GROUPS = {
    "ragged": [3, 0, 7, 1, 12],
    "all_empty": [0, 0, 0, 0, 0],
    "one_expert": [23, 0, 0, 0, 0],
    "last_expert": [0, 0, 0, 0, 23],
    "below_rows": [2, 2, 2, 0, 5],  # sum 11 < M: rows 11.. are zeros
    "above_rows": [10, 10, 10, 0, 5],  # sum 35 > M: ragged_dot never reaches the rest
}


def _operands(seed=0):
    kx, kw, kd = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kx, (M, K), jnp.float32),
            jax.random.normal(kw, (E, K, N), jnp.float32) * 0.2,
            jax.random.normal(kd, (E, N, K), jnp.float32) * 0.2)


@pytest.mark.parametrize("groups", list(GROUPS), ids=list(GROUPS))
@pytest.mark.parametrize("tile_rows", [None, 1, 4, 64])
def test_matches_ragged_dot_values_and_gradients(groups, tile_rows):
    x, w, _ = _operands()
    sizes = jnp.array(GROUPS[groups], jnp.int32)
    want = jax.lax.ragged_dot(x, w, sizes)
    got = tiled_grouped_matmul(x, w, sizes, jnp.float32, tile_rows)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))

    want_dx, want_dw = jax.grad(loss(lambda x, w: jax.lax.ragged_dot(x, w, sizes)), (0, 1))(x, w)
    got_dx, got_dw = jax.jit(jax.grad(loss(
        lambda x, w: tiled_grouped_matmul(x, w, sizes, jnp.float32, tile_rows)), (0, 1)))(x, w)
    np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_dw, want_dw, rtol=1e-5, atol=1e-5)


def test_schedule_tiles_cover_each_expert_rows_once():
    sizes = jnp.array([3, 0, 7, 1, 12], jnp.int32)
    s = tile_schedule(sizes, M, tile_rows=4)
    n = int(s.num_tiles)
    assert n == 1 + 2 + 1 + 3  # ceil(3/4) + ceil(7/4) + ceil(1/4) + ceil(12/4)
    covered = np.full(M, -1)
    for expert, start, end in zip(np.asarray(s.expert_t[:n]), np.asarray(s.start_t[:n]),
                                  np.asarray(s.end_t[:n])):
        assert 0 < end - start <= 4 and np.all(covered[start:end] == -1)
        covered[start:end] = expert
    np.testing.assert_array_equal(covered, np.repeat(np.arange(E), np.asarray(sizes)))


def test_default_tile_rows():
    assert default_tile_rows(4, 32) == 1  # batch-1 decode, K2-like: a row per routed expert
    assert default_tile_rows(32, 32) == 2
    assert default_tile_rows(128, 32) == 8
    assert default_tile_rows(1 << 16, 32) == 64


@pytest.mark.parametrize("groups", ["ragged", "below_rows", "all_empty"])
def test_fused_swiglu_matches_ragged_dot_values_and_gradients(groups):
    x, gate, down = _operands(1)
    up = gate[::-1] * 0.5
    sizes = jnp.array(GROUPS[groups], jnp.int32)

    def reference(x, gate, up, down):
        mm = lambda a, w: jax.lax.ragged_dot(a, w, sizes)  # noqa: E731
        return mm(jax.nn.silu(mm(x, gate)) * mm(x, up), down)

    def tiled(x, gate, up, down):
        return tiled_expert_swiglu(x, gate, up, down, sizes, jnp.float32, tile_rows=2)

    np.testing.assert_allclose(jax.jit(tiled)(x, gate, up, down), reference(x, gate, up, down),
                               rtol=1e-5, atol=1e-5)
    args = (x, gate, up, down)
    want = jax.grad(lambda *a: jnp.sum(reference(*a) ** 2), tuple(range(4)))(*args)
    got = jax.grad(lambda *a: jnp.sum(tiled(*a) ** 2), tuple(range(4)))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_int4_weights_dequantize_only_inside_the_tile_and_match():
    x, w, down = _operands(2)
    q_gate, q_up, q_down = (quant.quantize(a.astype(jnp.bfloat16)) for a in (w, w * 0.5, down))
    sizes = jnp.array(GROUPS["ragged"], jnp.int32)
    dense = [quant.dequantize(q, jnp.float32) for q in (q_gate, q_up, q_down)]
    mm = lambda a, w: jax.lax.ragged_dot(a, w, sizes)  # noqa: E731
    want = mm(jax.nn.silu(mm(x, dense[0])) * mm(x, dense[1]), dense[2])
    got = tiled_expert_swiglu(x, q_gate, q_up, q_down, sizes, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The gradient reaches the INT4 scales (values are integers): as through dequantize.
    want_ds = jax.grad(lambda s: jnp.sum(mm(x, quant.dequantize(
        quant.QuantizedWeight(q_gate.values, s), jnp.float32)) ** 2))(
        q_gate.scale.astype(jnp.float32))
    got_ds = jax.grad(lambda s: jnp.sum(tiled_grouped_matmul(
        x, quant.QuantizedWeight(q_gate.values, s), sizes, jnp.float32) ** 2))(
        q_gate.scale.astype(jnp.float32))
    np.testing.assert_allclose(got_ds, want_ds, rtol=1e-4, atol=1e-3)
