"""Blockwise attention (online softmax, recomputing backward) equals the plain attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import k2jax
from pallas_kernels.attention import api, blockwise, paged, reference

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


def test_blockwise_memory_stays_linear_under_remat():
    """Training runs its layers in a `lax.scan`, each under `jax.checkpoint`, with positions and
    segments as arguments: nothing computed from them alone (the block masks, T^2 of them) may
    be saved for the backward pass."""
    def temp_bytes(t):
        q, k, v, pos, seg, _ = _inputs(t, N, segments=True)
        layer = jax.checkpoint(
            lambda h, pos, seg: h + blockwise.attention(h, k, v, pos, pos, seg, seg,
                                                        scale=0.1).repeat(2, -1)[..., :K],
            policy=jax.checkpoint_policies.nothing_saveable)

        def loss(q, pos, seg):
            return jnp.sum(jax.lax.scan(lambda h, _: (layer(h, pos, seg), None), q, None,
                                        length=2)[0])

        return jax.jit(jax.grad(loss)).lower(q, pos, seg).compile().memory_analysis(
        ).temp_size_in_bytes

    assert temp_bytes(8192) < 5 * temp_bytes(2048)  # 4x the tokens


def _paged(context_bsx, page_size, num_pages, key):
    """A `[B, S, X]` context scattered into shuffled pages of a 2-layer pool (layer 1 holds it,
    layer 0 noise): `(pool [2, P, page, X], table [B, S / page])`."""
    b, s, x = context_bsx.shape
    width = s // page_size
    ids = jax.random.permutation(key, num_pages)[:b * width].reshape(b, width)
    pool = jax.random.normal(key, (2, num_pages, page_size, x))
    pool = pool.at[1, ids].set(context_bsx.reshape(b, width, page_size, x))
    return pool, ids.astype(jnp.int32)


def test_absorbed_paged_decode_over_16k_context_equals_expanded():
    """MLA's two forms: per-head keys and values up-projected from the latent (expanded, plain
    attention) against one shared `[C + R]` key and `[C]` value read from a paged cache in
    shuffled pages (absorbed), the last queries of a 16K-token context."""
    c, r, h = TINY.kv_lora_rank, TINY.qk_rope_head_dim, TINY.qk_nope_head_dim
    s, t, page = 16384, 3, 64
    ks = jax.random.split(jax.random.key(7), 7)
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
    ckv_pool, table = _paged(ckv, page, 300, ks[6])
    kpe_pool, _ = _paged(kpe, page, 300, ks[6])
    latent = paged.paged_latent_attention(q_latent, q_pe, ckv_pool, kpe_pool, table, 1, q_pos,
                                          scale=scale)
    absorbed = jnp.einsum("btnc,nuc->btnu", latent, w_uv_nuc)
    np.testing.assert_allclose(absorbed, expanded, atol=1e-5, rtol=1e-4)


def _paged_case(dtype):
    """Three rows over a 2-layer pool of 13 pages of 8: shuffled pages, a prefill chunk that
    starts mid-page, a row with an unallocated page past its queries, a padding row (-1)."""
    c, r, n, t = TINY.kv_lora_rank, TINY.qk_rope_head_dim, N, 5
    ks = jax.random.split(jax.random.key(11), 4)
    q_latent = jax.random.normal(ks[0], (3, t, n, c))
    q_pe = jax.random.normal(ks[1], (3, t, n, r))
    ckv = jax.random.normal(ks[2], (2, 13, 8, c)).astype(dtype)
    kpe = jax.random.normal(ks[3], (2, 13, 8, r)).astype(dtype)
    table = jnp.array([[4, 11, 0, 7], [2, 9, 13, 13], [13, 13, 13, 13]], jnp.int32)
    q_pos = jnp.array([[19, 20, 21, 22, 23], [3, 4, 5, 6, 7], [-1] * 5], jnp.int32)
    return q_latent, q_pe, ckv, kpe, table, q_pos


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_paged_reference_equals_plain_attention_over_the_pages(dtype):
    q_latent, q_pe, ckv, kpe, table, q_pos = _paged_case(dtype)
    got = paged.reference(q_latent, q_pe, ckv, kpe, table, 1, q_pos, scale=0.2)
    for row, used in ((0, [4, 11, 0, 7]), (1, [2])):  # each row's context, in position order
        ckv_sc = ckv[1, jnp.array(used)].reshape(-1, ckv.shape[-1]).astype(jnp.float32)
        kpe_sr = kpe[1, jnp.array(used)].reshape(-1, kpe.shape[-1]).astype(jnp.float32)
        want = reference.attention(
            jnp.concatenate([q_latent[row:row + 1], q_pe[row:row + 1]], -1),
            jnp.concatenate([ckv_sc, kpe_sr], -1)[None, :, None], ckv_sc[None, :, None],
            q_pos[row:row + 1], jnp.arange(ckv_sc.shape[0])[None], scale=0.2)
        np.testing.assert_allclose(got[row].astype(jnp.float32), want[0],
                                   atol=ATOL if dtype == jnp.float32 else 2e-2)
    assert not np.any(np.asarray(got[2], np.float32))  # padding row: zeros


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_paged_kernels_equal_the_reference_in_interpret_mode(platform, dtype):
    """The kernels read the pages through the table where they lie; the XLA version gathers
    them. bf16 pools and queries: the kernels' float32 softmax against the reference's."""
    args = _paged_case(dtype)
    q_latent, q_pe = (a.astype(dtype) for a in args[:2])
    want = paged.paged_latent_attention(q_latent, q_pe, *args[2:4], args[4], 1, args[5],
                                        scale=0.2, impl="reference")
    got = paged.paged_latent_attention(q_latent, q_pe, *args[2:4], args[4], 1, args[5],
                                       scale=0.2, impl="pallas", platform=platform,
                                       interpret=True)
    assert got.dtype == dtype and got.shape == q_latent.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=ATOL if dtype == jnp.float32 else 2e-2)


def test_paged_api_refuses_mismatched_dims():
    q_latent, q_pe, ckv, kpe, table, q_pos = _paged_case(jnp.float32)
    with pytest.raises(ValueError, match="do not match the pages"):
        paged.paged_latent_attention(q_latent[..., :-1], q_pe, ckv, kpe, table, 1, q_pos,
                                     scale=0.2)
    with pytest.raises(ValueError, match="impl"):
        paged.paged_latent_attention(q_latent, q_pe, ckv, kpe, table, 1, q_pos, scale=0.2,
                                     impl="flash")


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


def test_max_scores_equal_the_plain_maximum():
    """QK-clip's statistic block by block: each query's largest visible score, segments and a
    query that sees nothing included; linear memory like the attention."""
    q, k, _, pos, seg, _ = _inputs(1531, N, segments=True)
    q_pos = pos.at[0, 7].set(-1)
    got = blockwise.max_scores(q, k, q_pos, pos, seg, seg, scale=0.3, block=256, block_q=128)
    scores = jnp.einsum("btnk,bsnk->btns", q, k) * 0.3
    mask = reference.visible(q_pos, pos, seg, seg)[:, :, None, :]
    want = jnp.max(jnp.where(mask, scores, reference.NEG_INF), axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[0, 7].max() == reference.NEG_INF
