"""Parity with HF transformers' DeepseekV3ForCausalLM on tiny random configs.

Tolerance: float32 logits agree to 1e-4 of the reference's largest logit magnitude
(max |ours - hf| <= 1e-4 * max |hf|), on sequences longer than the YaRN
`original_max_position_embeddings` so the scaled frequencies are exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import pytest

import k2jax
from k2jax.moe import Router
from tests.hf_reference import hf_logits, hf_routing, params_from_hf_model, random_hf_model

RTOL = 1e-4

# YaRN past a 32-token original context, so that 48-token sequences run beyond it.
_TINY = k2jax.ModelConfig.preset("tiny").replace(
    max_position_embeddings=128,
    rope_scaling=k2jax.RopeScaling(factor=4.0, original_max_position_embeddings=32,
                                   mscale=1.0, mscale_all_dim=1.0))
# K2's yarn has beta_fast = beta_slow = 1.
K2_STYLE = _TINY.replace(
    dtype="float32", n_group=1, topk_group=1, n_routed_experts=12, num_experts_per_tok=3,
    num_hidden_layers=3, first_k_dense_replace=1,
    rope_scaling=k2jax.RopeScaling(factor=4.0, original_max_position_embeddings=32,
                                   beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
DSV3_STYLE = _TINY.replace(
    dtype="float32", model_type="deepseek_v3", n_group=4, topk_group=2, n_routed_experts=16,
    num_experts_per_tok=4, num_hidden_layers=4, first_k_dense_replace=2,
    routed_scaling_factor=2.5, rope_theta=10000.0)
# No YaRN, no q-lora, no dense layer, two shared experts, unnormalised top-k weights.
PLAIN_STYLE = _TINY.replace(
    dtype="float32", model_type="deepseek_v3", rope_scaling=None, q_lora_rank=None,
    first_k_dense_replace=0, num_hidden_layers=2, n_shared_experts=2, norm_topk_prob=False,
    routed_scaling_factor=1.0)
CONFIGS = {"k2": K2_STYLE, "dsv3": DSV3_STYLE, "plain": PLAIN_STYLE}


def _tokens(config, batch, length, seed):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, length))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request):
    config = CONFIGS[request.param]
    model = random_hf_model(config, seed=len(request.param))
    return config, model, params_from_hf_model(config, model)


def test_sequence_exercises_yarn(reference):
    config, _, _ = reference
    assert config.rope_scaling is None or 48 > config.rope_scaling.original_max_position_embeddings


def test_logits_match_hf(reference):
    config, model, params = reference
    tokens = _tokens(config, 3, 48, seed=1)
    expected = hf_logits(model, tokens)
    got = np.asarray(k2jax.logits(config, params, jnp.asarray(tokens, jnp.int32)))
    assert got.dtype == np.float32 and got.shape == expected.shape
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err <= RTOL, f"max relative logit error {err:.2e}"


def test_routing_matches_hf_per_layer(reference):
    """Indices and combine weights equal HF's on HF's own router inputs, in every MoE layer."""
    config, model, params = reference
    records = hf_routing(model, _tokens(config, 2, 40, seed=2))
    assert len(records) == config.num_moe_layers
    moe = params["moe_layers"]["mlp"]["gate"]
    for layer, (x_td, hf_weights, hf_indices) in enumerate(records):
        layer_params = jax.tree.map(lambda a: a[layer], moe)
        weights, indices, _ = Router(config).apply({"params": layer_params},
                                                   jnp.asarray(x_td))
        weights, indices = np.asarray(weights), np.asarray(indices)
        # HF returns top-k unsorted: compare as (index -> weight) maps.
        order_ours, order_hf = np.argsort(indices, -1), np.argsort(hf_indices, -1)
        np.testing.assert_array_equal(np.take_along_axis(indices, order_ours, -1),
                                      np.take_along_axis(hf_indices, order_hf, -1))
        np.testing.assert_allclose(np.take_along_axis(weights, order_ours, -1),
                                   np.take_along_axis(hf_weights, order_hf, -1),
                                   rtol=1e-6, atol=1e-6)


def test_bias_selects_but_does_not_weight(reference):
    """The correction bias changes which experts win, and the weights stay unbiased scores."""
    config, _, params = reference
    gate = jax.tree.map(lambda a: a[0], params["moe_layers"]["mlp"]["gate"])
    x_td = jax.random.normal(jax.random.key(3), (64, config.hidden_size))
    logits_te = x_td @ gate["kernel"]
    biased = dict(gate, e_score_correction_bias=gate["e_score_correction_bias"] * 40)
    weights, indices, _ = Router(config).apply({"params": biased}, x_td)
    _, unbiased_indices, _ = Router(config).apply(
        {"params": dict(gate, e_score_correction_bias=np.zeros_like(
            gate["e_score_correction_bias"]))}, x_td)
    assert (np.asarray(indices) != np.asarray(unbiased_indices)).any()
    chosen = np.take_along_axis(np.asarray(jax.nn.sigmoid(logits_te)), np.asarray(indices), -1)
    if config.norm_topk_prob:
        chosen = chosen / chosen.sum(-1, keepdims=True)
    expected = chosen * config.routed_scaling_factor
    np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-6)


def test_expert_load_matches_hf_selection(reference):
    """Full-forward selection: per-layer expert counts equal HF's."""
    from k2jax.model import Transformer

    config, model, params = reference
    tokens = _tokens(config, 2, 40, seed=4)
    records = hf_routing(model, tokens)
    _, _, stats = Transformer(config).apply({"params": params}, jnp.asarray(tokens))
    hf_load = np.stack([np.bincount(ix.reshape(-1), minlength=config.n_routed_experts)
                        for _, _, ix in records])
    np.testing.assert_array_equal(np.asarray(stats.expert_load), hf_load)


def hf_max_attention_logits(model, tokens: np.ndarray) -> np.ndarray:
    """`[L, N]`: each layer's and head's largest masked pre-softmax score in HF's eager
    attention (scaling included), recorded by wrapping it."""
    import transformers.models.deepseek_v3.modeling_deepseek_v3 as modeling

    original, maxima = modeling.eager_attention_forward, []

    def recording(module, query, key, value, attention_mask, scaling, **kwargs):
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = torch.where(attention_mask.bool() if attention_mask.dtype == torch.bool
                                 else attention_mask == 0, scores, -torch.inf)
        maxima.append(scores.amax(dim=(0, 2, 3)).detach().numpy())
        return original(module, query, key, value, attention_mask, scaling, **kwargs)

    modeling.eager_attention_forward = recording
    try:
        hf_logits(model, tokens)
    finally:
        modeling.eager_attention_forward = original
    return np.stack(maxima)


def test_max_attention_logits_match_hf(reference):
    """The per-head maximum logit QK-clip reads equals the maximum of HF's own scores."""
    from k2jax.model import Transformer

    config, model, params = reference
    tokens = _tokens(config, 2, 40, seed=5)
    expected = hf_max_attention_logits(model, tokens)
    _, _, stats = Transformer(config, max_logits=True).apply({"params": params},
                                                            jnp.asarray(tokens))
    got = np.concatenate([np.asarray(stats.max_logits[name])
                          for name, _, _ in config.layer_stacks])
    assert got.shape == (config.num_hidden_layers, config.num_attention_heads)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_balance_loss_matches_its_definition_on_hf_routing(reference):
    """DeepSeek-V3's sequence-wise balance loss, written out in numpy over HF's router inputs
    and selections, equals the model's."""
    from k2jax.model import Transformer

    config, model, params = reference
    rows, length, e, k = 2, 40, config.n_routed_experts, config.num_experts_per_tok
    tokens = _tokens(config, rows, length, seed=6)
    per_layer = []
    for layer, (x_td, _, indices_tk) in zip(model.model.layers[config.first_k_dense_replace:],
                                            hf_routing(model, tokens)):
        scores = 1 / (1 + np.exp(-(x_td.astype(np.float64)
                                   @ layer.mlp.gate.weight.detach().double().numpy().T)))
        affinity = (scores / scores.sum(-1, keepdims=True)).reshape(rows, length, e)
        chosen = indices_tk.reshape(rows, length * k)
        f = np.stack([np.bincount(c, minlength=e) for c in chosen]) * e / (k * length)
        per_layer.append(np.mean(np.sum(f * affinity.mean(axis=1), axis=-1)))
    _, _, stats = Transformer(config, balance_loss=True).apply({"params": params},
                                                              jnp.asarray(tokens))
    np.testing.assert_allclose(float(stats.balance_loss), np.mean(per_layer), rtol=1e-5)
