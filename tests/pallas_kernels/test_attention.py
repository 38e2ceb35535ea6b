"""Blockwise attention (online softmax, recomputing backward) equals the plain attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import k2jax
from pallas_kernels.attention import api, blockwise, reference

TINY = k2jax.ModelConfig.preset("tiny")
N, K, U = TINY.num_attention_heads, TINY.qk_head_dim, TINY.v_head_dim
# float32 throughout; the two differ only in the order of the softmax sums.
ATOL = 2e-5


def _inputs(t, groups, key=0, segments=False):
    ks = jax.random.split(jax.random.key(key), 4)
    q = jax.random.normal(ks[0], (1, t, N, K))
    k = jax.random.normal(ks[1], (1, t, groups, K))
    v = jax.random.normal(ks[2], (1, t, groups, U))
    pos = jnp.arange(t)[None]
    seg = (jnp.arange(t)[None] >= t // 3).astype(jnp.int32) if segments else None
    return q, k, v, pos, seg, jax.random.normal(ks[3], (1, t, N, U))


@pytest.mark.parametrize("t,groups,segments", [(1024, N, False), (4096, N, True),
                                              (1531, 1, False), (1531, N, True)])
def test_blockwise_equals_plain_forward_and_gradients(t, groups, segments):
    """At tiny's head dims (q/k 24, v 16); 1531 is odd and not a multiple of the block."""
    q, k, v, pos, seg, weight = _inputs(t, groups, segments=segments)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, pos, pos, seg, seg,
                                          scale=TINY.softmax_scale) * weight)

    plain = jax.jit(jax.value_and_grad(loss(reference.attention), argnums=(0, 1, 2)))
    blocks = jax.jit(jax.value_and_grad(loss(blockwise.attention), argnums=(0, 1, 2)))
    (want, want_grads), (got, got_grads) = plain(q, k, v), blocks(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=1e-4)
    out = blockwise.attention(q, k, v, pos, pos, seg, seg, scale=TINY.softmax_scale)
    np.testing.assert_allclose(
        out, reference.attention(q, k, v, pos, pos, seg, seg, scale=TINY.softmax_scale),
        atol=ATOL)


def test_padding_queries_and_keys_give_zeros_and_no_gradient():
    q, k, v, pos, _, weight = _inputs(40, N)
    q_pos = pos.at[0, :5].set(-1)  # queries that see nothing
    kv_pos = pos.at[0, 30:].set(2**31 - 1)  # keys nobody sees
    out = blockwise.attention(q, k, v, q_pos, kv_pos, scale=0.2, block=16)
    assert np.all(np.asarray(out[0, :5]) == 0)
    np.testing.assert_allclose(out, reference.attention(q, k, v, q_pos, kv_pos, scale=0.2),
                               atol=ATOL)
    grads = jax.grad(lambda k, v: jnp.sum(
        blockwise.attention(q, k, v, q_pos, kv_pos, scale=0.2, block=16) * weight),
        argnums=(0, 1))(k, v)
    assert all(np.all(np.asarray(g[0, 30:]) == 0) for g in grads)


def test_blockwise_memory_is_linear_in_length():
    """The compiled temporaries: blockwise stays at T x block, the plain one grows as T^2."""
    def temp_bytes(fn, t):
        q, k, v, pos, _, _ = _inputs(t, N)
        grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, pos, pos, scale=0.1)),
                        argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(blockwise.attention, 2048), temp_bytes(blockwise.attention, 8192)
    assert large < 5 * small  # 4x the tokens
    assert temp_bytes(reference.attention, 8192) > 10 * large


def test_absorbed_decode_over_16k_context_equals_expanded():
    """MLA's two forms through the blockwise op: per-head keys and values up-projected from the
    latent (expanded) against one shared `[C + R]` key and `[C]` value (absorbed), the last
    queries of a 16K-token context."""
    c, r, h = TINY.kv_lora_rank, TINY.qk_rope_head_dim, TINY.qk_nope_head_dim
    s, t = 16384, 3
    ks = jax.random.split(jax.random.key(7), 6)
    ckv = jax.random.normal(ks[0], (1, s, c))
    kpe = jax.random.normal(ks[1], (1, s, r))
    w_uk_nhc = jax.random.normal(ks[2], (N, h, c)) / np.sqrt(c)
    w_uv_nuc = jax.random.normal(ks[3], (N, U, c)) / np.sqrt(c)
    q_nope = jax.random.normal(ks[4], (1, t, N, h))
    q_pe = jax.random.normal(ks[5], (1, t, N, r))
    q_pos, kv_pos = jnp.arange(s - t, s)[None], jnp.arange(s)[None]
    scale = TINY.softmax_scale

    k_nope = jnp.einsum("bsc,nhc->bsnh", ckv, w_uk_nhc)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(kpe[:, :, None], (1, s, N, r))], axis=-1)
    v = jnp.einsum("bsc,nuc->bsnu", ckv, w_uv_nuc)
    expanded = api.attention(jnp.concatenate([q_nope, q_pe], -1), k, v, q_pos, kv_pos,
                             scale=scale, impl="reference")
    q_latent = jnp.einsum("btnh,nhc->btnc", q_nope, w_uk_nhc)
    latent = api.attention(jnp.concatenate([q_latent, q_pe], -1),
                           jnp.concatenate([ckv, kpe], -1)[:, :, None], ckv[:, :, None],
                           q_pos, kv_pos, scale=scale)
    absorbed = jnp.einsum("btnc,nuc->btnu", latent, w_uv_nuc)
    np.testing.assert_allclose(absorbed, expanded, atol=1e-5, rtol=1e-4)


def test_api_refuses_heads_that_do_not_split():
    q, k, v, pos, _, _ = _inputs(8, N)
    with pytest.raises(ValueError, match="do not split"):
        api.attention(q, k[:, :, :3], v[:, :, :3], pos, pos, scale=1.0)
    with pytest.raises(ValueError, match="impl"):
        api.attention(q, k, v, pos, pos, scale=1.0, impl="flash")


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("t,s,groups", [(77, 77, N), (5, 300, 1), (1, 130, 1)],
                         ids=["expanded", "absorbed-prefill", "absorbed-decode"])
def test_pallas_kernels_equal_the_reference_in_interpret_mode(platform, t, s, groups):
    """Forward from the kernel, gradient from the blockwise version: both equal the plain
    attention (queries at the end of the context, a segment boundary inside it)."""
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (2, t, N, K))
    k = jax.random.normal(ks[1], (2, s, groups, K))
    v = jax.random.normal(ks[2], (2, s, groups, U))
    q_pos = jnp.broadcast_to(jnp.arange(s - t, s), (2, t))
    kv_pos = jnp.broadcast_to(jnp.arange(s), (2, s))
    q_seg = (q_pos >= s // 4).astype(jnp.int32)
    kv_seg = (kv_pos >= s // 4).astype(jnp.int32)
    weight = jax.random.normal(ks[3], (2, t, N, U))

    def loss(impl, **kw):
        return lambda q, k, v: jnp.sum(api.attention(
            q, k, v, q_pos, kv_pos, q_seg, kv_seg, scale=0.2, impl=impl, **kw) * weight)

    want = jax.value_and_grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    got = jax.value_and_grad(loss("pallas", platform=platform, interpret=True),
                             argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=1e-4)
    out = api.attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, scale=0.2, impl="pallas",
                        platform=platform, interpret=True)
    np.testing.assert_allclose(out, api.attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg,
                                                  scale=0.2, impl="reference"), atol=ATOL)


def test_auto_keeps_xla_under_a_partitioned_mesh():
    """A Pallas call is not partitioned by XLA: under a multi-device mesh "auto" stays XLA,
    inside `shard_map` (each device its own arrays) the kernel is allowed again."""
    from k2jax import sharding

    assert not api._partitioned_by_xla()
    mesh = sharding.make_mesh("expert=8")
    seen = {}
    with jax.set_mesh(mesh):
        seen["mesh"] = api._partitioned_by_xla()

        def per_device(x):
            seen["shard_map"] = api._partitioned_by_xla()
            return x

        jax.shard_map(per_device, mesh=mesh, in_specs=jax.sharding.PartitionSpec("expert"),
                      out_specs=jax.sharding.PartitionSpec("expert"))(jnp.zeros(8))
    assert seen == {"mesh": True, "shard_map": False}
