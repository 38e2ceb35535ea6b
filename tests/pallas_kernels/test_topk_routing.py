"""Top-k routing: both Pallas kernels (interpret mode) give the reference's indices and weights
exactly; the reference agrees with HF transformers' DeepseekV3TopkRouter; gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from kernel_cases import PLATFORMS
from pallas_kernels.topk_routing import reference, route

# (tokens, experts, top_k, n_group, topk_group)
CASES = [
    (37, 48, 6, 1, 1),      # experts and k not powers of two, tokens past a tile
    (20, 384, 8, 1, 1),     # Kimi K2
    (33, 256, 8, 8, 4),     # DeepSeek-V3 group limit
]
SCALING = 2.827


def _inputs(seed, tokens, experts, ties=False):
    kl, kb = jax.random.split(jax.random.key(seed))
    logits = jax.random.normal(kl, (tokens, experts), jnp.float32) * 2
    bias = jax.random.normal(kb, (experts,), jnp.float32) * 0.1
    if ties:  # few distinct scores: many ties, which must go to the lowest index
        logits, bias = jnp.round(logits), jnp.zeros_like(bias)
    return logits, bias


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("tokens,experts,top_k,n_group,topk_group", CASES)
def test_kernel_equals_reference_exactly(platform, ties, tokens, experts, top_k, n_group,
                                         topk_group):
    logits, bias = _inputs(tokens + experts, tokens, experts, ties)
    params = dict(top_k=top_k, n_group=n_group, topk_group=topk_group,
                  routed_scaling_factor=SCALING)
    w_ref, i_ref = reference.route(logits, bias, **params)
    w, i = route(logits, bias, impl="pallas", platform=platform, interpret=True, **params)
    assert i.dtype == jnp.int32 and w.dtype == jnp.float32
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(w, w_ref)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_kernel_without_normalisation(platform):
    logits, bias = _inputs(0, 24, 64)
    params = dict(top_k=6, norm_topk_prob=False, routed_scaling_factor=1.5)
    w, i = route(logits, bias, impl="pallas", platform=platform, interpret=True, **params)
    w_ref, i_ref = reference.route(logits, bias, **params)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(w, w_ref)


@pytest.mark.parametrize("tokens,experts,top_k,n_group,topk_group", CASES)
def test_reference_matches_hf_router(tokens, experts, top_k, n_group, topk_group):
    hidden = 32
    config = DeepseekV3Config(hidden_size=hidden, n_routed_experts=experts,
                              num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
                              norm_topk_prob=True, routed_scaling_factor=SCALING)
    router = DeepseekV3TopkRouter(config)
    gen = torch.Generator().manual_seed(tokens)
    with torch.no_grad():
        router.weight.normal_(generator=gen)
        router.e_score_correction_bias.normal_(generator=gen).mul_(0.1)
    hidden_states = torch.randn(tokens, hidden, generator=gen)
    with torch.no_grad():
        logits_t, w_hf, i_hf = router(hidden_states)
    w, i = reference.route(jnp.asarray(logits_t.numpy()),
                           jnp.asarray(router.e_score_correction_bias.numpy()), top_k=top_k,
                           n_group=n_group, topk_group=topk_group, routed_scaling_factor=SCALING)
    # HF returns the k experts unsorted: compare sorted by expert index.
    order_hf, order = np.argsort(i_hf.numpy(), -1), np.argsort(np.asarray(i), -1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(i), order, -1),
                                  np.take_along_axis(i_hf.numpy(), order_hf, -1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, -1),
                               np.take_along_axis(w_hf.numpy(), order_hf, -1), rtol=1e-6)


def _dense_weights(logits, indices, scaling):
    """Normalised, scaled sigmoid of the chosen logits, written out for autodiff."""
    chosen = jax.nn.sigmoid(jnp.take_along_axis(logits, indices, axis=-1))
    return chosen / jnp.sum(chosen, -1, keepdims=True) * scaling


@pytest.mark.parametrize("impl,platform", [("reference", None), ("pallas", "gpu"),
                                           ("pallas", "tpu")])
def test_weights_gradient_in_logits(impl, platform):
    logits, bias = _inputs(1, 12, 64)
    cotangent = jax.random.normal(jax.random.key(2), (12, 6))
    _, indices = reference.route(logits, bias, top_k=6, routed_scaling_factor=SCALING)

    def loss(logits, bias):
        w, _ = route(logits, bias, top_k=6, routed_scaling_factor=SCALING, impl=impl,
                     platform=platform, interpret=impl == "pallas")
        return jnp.sum(w * cotangent)

    d_logits, d_bias = jax.grad(loss, argnums=(0, 1))(logits, bias)
    want = jax.grad(lambda lg: jnp.sum(_dense_weights(lg, indices, SCALING) * cotangent))(logits)
    np.testing.assert_allclose(d_logits, want, rtol=1e-5, atol=1e-6)
    assert not np.asarray(d_bias).any(), "the bias is selection state, never differentiated"
