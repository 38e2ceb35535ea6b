"""The statistics forward equals the model's forward; QK-clip scales exactly the heads over the
threshold to it; the balance loss is 1 when balanced; bias updates even out expert load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.model import Transformer
from pallas_kernels.topk_routing import route
from tests.train.common import CONFIG, fast_jit, random_master, random_tokens
from train import balance, qat, qk_clip
from train.forward import forward, sequence_balance_loss

F32 = CONFIG.replace(dtype="float32")


@pytest.fixture(scope="module")
def setup():
    params = random_master(F32)
    tokens = random_tokens(F32, (2, 24))
    segments = jnp.asarray(np.where(np.arange(24) < 10, 1, 2)[None].repeat(2, 0), jnp.int32)
    positions = jnp.where(segments == 1, jnp.arange(24), jnp.arange(24) - 10).astype(jnp.int32)
    batch = {"tokens": tokens, "positions": positions, "segment_ids": segments}
    stats = fast_jit(lambda p: forward(F32, p, batch, balance_loss=True, max_logits=True))
    return params, batch, stats


def test_statistics_forward_equals_the_model(setup):
    params, batch, stats = setup
    out = stats(params)
    logits, _, load = fast_jit(lambda p: Transformer(F32).apply(
        {"params": p}, batch["tokens"], batch["positions"], batch["segment_ids"]))(params)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(out.expert_load), np.asarray(load))
    assert {k: v.shape for k, v in out.max_logits.items()} == {
        "dense_layers": (1, F32.num_attention_heads), "moe_layers": (1, F32.num_attention_heads)}
    assert np.isfinite(float(out.balance_loss)) and float(out.balance_loss) > 0


def test_qk_clip_brings_exactly_the_hot_heads_to_the_threshold(setup):
    params, _, stats = setup
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
    h = jnp.zeros((3, 5, F32.hidden_size))
    kernel = jnp.zeros((F32.hidden_size, F32.n_routed_experts))
    indices = jax.random.randint(jax.random.key(0), (15, F32.num_experts_per_tok), 0,
                                 F32.n_routed_experts)
    loss = sequence_balance_loss(F32, h, kernel, indices, jnp.ones((3, 5), bool))
    np.testing.assert_allclose(np.asarray(loss), [1.0], rtol=1e-6)


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
