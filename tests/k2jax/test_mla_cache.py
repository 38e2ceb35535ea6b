"""Absorbed MLA with the latent cache equals the expanded form of the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import k2jax

CONFIG = k2jax.ModelConfig.preset("tiny").replace(dtype="float32")


@pytest.fixture(scope="module")
def params():
    params = k2jax.init_params(CONFIG, jax.random.key(0))
    # Non-zero router bias, so cached and uncached routing must agree on biased selection.
    bias = params["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"]
    params["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"] = (
        0.05 * jax.random.normal(jax.random.key(1), bias.shape))
    return params


@pytest.mark.parametrize("serving_layout", [False, True], ids=["stacked", "serving_layout"])
def test_prefill_then_decode_equals_full_forward(params, serving_layout):
    batch, prompt_len, total = 2, 37, 45  # past the 32-token YaRN original context
    tokens = jax.random.randint(jax.random.key(2), (batch, total), 0, CONFIG.vocab_size)
    full = np.asarray(k2jax.logits(CONFIG, params, tokens))

    cache = k2jax.init_cache(CONFIG, batch, 64, jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
    step = jax.jit(lambda p, t, pos, c: k2jax.forward_cached(CONFIG, p, t, pos, c,
                                                             serving_layout=serving_layout))
    if serving_layout:
        params = k2jax.to_serving_layout(params)
    prefill, cache = step(params, tokens[:, :prompt_len], positions, cache)
    outs = [np.asarray(prefill)]
    for t in range(prompt_len, total):
        pos = jnp.full((batch, 1), t)
        logits_t, cache = step(params, tokens[:, t:t + 1], pos, cache)
        outs.append(np.asarray(logits_t))
    cached = np.concatenate(outs, axis=1)
    err = np.abs(cached - full).max() / np.abs(full).max()
    assert err < 1e-5, f"absorbed vs expanded relative error {err:.2e}"


def test_cache_holds_only_the_latent():
    cache = k2jax.init_cache(CONFIG, batch=3, max_len=16, dtype=jnp.bfloat16)
    per_token_per_layer = sum(
        c.ckv.dtype.itemsize * c.ckv.shape[-1] + c.kpe.dtype.itemsize * c.kpe.shape[-1]
        for c in cache.values()) / len(cache)
    assert per_token_per_layer == (CONFIG.kv_lora_rank + CONFIG.qk_rope_head_dim) * 2
    layers = sum(c.ckv.shape[0] for c in cache.values())
    assert layers == CONFIG.num_hidden_layers


def test_rows_at_different_positions(params):
    """Rows of one batch decoding at different positions match their own full forwards."""
    lengths = [5, 11]
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, CONFIG.vocab_size)
    cache = k2jax.init_cache(CONFIG, 2, 16, jnp.float32)
    forward_cached = jax.jit(lambda p, t, pos, c: k2jax.forward_cached(CONFIG, p, t, pos, c))
    logits_of = jax.jit(lambda p, t: k2jax.logits(CONFIG, p, t))
    for row, n in enumerate(lengths):
        # Prefill each row alone into its own slot of the shared cache.
        row_cache = jax.tree.map(lambda c: c[:, row:row + 1], cache)
        _, row_cache = forward_cached(params, tokens[row:row + 1, :n], jnp.arange(n)[None],
                                      row_cache)
        cache = jax.tree.map(lambda c, r: c.at[:, row:row + 1].set(r), cache, row_cache)
    next_tokens = jnp.stack([tokens[0, 5], tokens[1, 11]])[:, None]
    logits, _ = forward_cached(params, next_tokens, jnp.array([[5], [11]]), cache)
    for row, n in enumerate(lengths):
        full = logits_of(params, tokens[row:row + 1, :n + 1])[0, -1]
        np.testing.assert_allclose(np.asarray(logits[row, 0]), np.asarray(full),
                                   rtol=1e-5, atol=1e-5 * float(jnp.abs(full).max()))
