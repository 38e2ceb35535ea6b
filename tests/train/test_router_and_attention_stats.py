"""Asking the model for statistics leaves its forward unchanged; QK-clip scales exactly the heads
over the threshold to it; the balance loss is 1 when balanced; bias updates even out expert load.
(The statistics' values are checked against HF in tests/k2jax/test_model_parity.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.model import Transformer
from k2jax.moe import sequence_balance_loss
from pallas_kernels.topk_routing import route
from tests.train.common import CONFIG, fast_jit, random_master, random_tokens
from train import balance, qat, qk_clip

F32 = CONFIG.replace(dtype="float32")


@pytest.fixture(scope="module")
def setup():
    params = random_master(F32)
    tokens = random_tokens(F32, (2, 24))
    segments = jnp.asarray(np.where(np.arange(24) < 10, 1, 2)[None].repeat(2, 0), jnp.int32)
    positions = jnp.where(segments == 1, jnp.arange(24), jnp.arange(24) - 10).astype(jnp.int32)
    batch = {"tokens": tokens, "positions": positions, "segment_ids": segments}
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    with_stats = Transformer(F32, max_logits=True, balance_loss=True)
    forward = fast_jit(lambda p: with_stats.apply({"params": p}, *args))
    return params, args, lambda p: forward(p)[2], forward


def test_statistics_leave_the_forward_unchanged(setup):
    params, args, _, forward = setup
    logits, _, stats = forward(params)
    plain_logits, _, plain = fast_jit(lambda p: Transformer(F32).apply({"params": p}, *args))(
        params)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain_logits))
    np.testing.assert_array_equal(np.asarray(stats.expert_load), np.asarray(plain.expert_load))
    assert plain.max_logits is None and plain.balance_loss is None
    assert {k: v.shape for k, v in stats.max_logits.items()} == {
        "dense_layers": (1, F32.num_attention_heads), "moe_layers": (1, F32.num_attention_heads)}
    assert np.isfinite(float(stats.balance_loss)) and float(stats.balance_loss) > 0


def test_qk_clip_brings_exactly_the_hot_heads_to_the_threshold(setup):
    params, _, stats, _ = setup
    # Larger query weights so that heads differ clearly; only the first layer's statistics are
    # compared, since clipping changes what later layers receive.
    leaves = qat.flat(params)
    q_path = ("dense_layers", "self_attn", "q_b_proj", "kernel")
    scale = jnp.repeat(jnp.linspace(1.0, 40.0, F32.num_attention_heads), F32.qk_head_dim)
    params = qat.unflat({**leaves, q_path: leaves[q_path] * scale})
    before = np.asarray(stats(params).max_logits["dense_layers"][0])
    threshold = float(np.median(before))
    hot = before > threshold
    assert 0 < hot.sum() < len(hot)
    clipped = qk_clip.apply_qk_clip(params, F32, {"dense_layers": jnp.asarray(before[None])},
                                    threshold)
    after = np.asarray(stats(clipped).max_logits["dense_layers"][0])
    np.testing.assert_allclose(after[hot], threshold, rtol=1e-5)
    np.testing.assert_array_equal(after[~hot], before[~hot])
    old, new = qat.flat(params), qat.flat(clipped)
    kv_b = ("dense_layers", "self_attn", "kv_b_proj", "kernel")
    def values(kernel):
        heads = np.asarray(kernel).reshape(*kernel.shape[:-1], F32.num_attention_heads, -1)
        return heads[..., F32.qk_nope_head_dim:]

    np.testing.assert_array_equal(values(new[kv_b]), values(old[kv_b]))
    for path in old:
        if path[0] == "moe_layers" or "self_attn" not in path or path[-2] in (
                "q_a_proj", "kv_a_proj_with_mqa", "o_proj", "q_a_layernorm", "kv_a_layernorm"):
            np.testing.assert_array_equal(np.asarray(new[path]), np.asarray(old[path]))


def test_balance_loss_is_one_for_uniform_scores():
    logits = jnp.zeros((3, 5, F32.n_routed_experts))
    indices = jax.random.randint(jax.random.key(0), (3, 5, F32.num_experts_per_tok), 0,
                                 F32.n_routed_experts)
    loss = sequence_balance_loss(logits, indices, jnp.ones((3, 5), bool))
    np.testing.assert_allclose(np.asarray(loss), 1.0, rtol=1e-6)


def test_bias_updates_even_out_expert_load():
    experts, k = 16, 2
    popularity = jnp.linspace(-1.5, 1.5, experts)
    logits = jax.random.normal(jax.random.key(1), (2048, experts)) + popularity

    @jax.jit
    def load_of(bias):
        _, idx = route(logits, bias, top_k=k)
        return jnp.bincount(idx.reshape(-1), length=experts)[None]

    bias = jnp.zeros((1, experts))
    imbalance = []
    for _ in range(300):
        load = load_of(bias)
        imbalance.append(float(load.max() / load.mean()))
        new_bias = balance.updated_bias(bias, load, rate=0.01)
        overloaded = np.asarray(load[0] > load.mean())
        assert np.all(np.asarray(new_bias - bias)[0][overloaded] < 0)
        assert np.all(np.asarray(new_bias - bias)[0][~overloaded] >= 0)
        bias = new_bias
    assert imbalance[0] > 3.0 and max(imbalance[-20:]) < 1.3
