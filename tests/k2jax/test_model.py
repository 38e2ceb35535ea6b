"""Forward-pass properties beyond HF parity: packing, gradients, bf16, INT4 leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import k2jax
from k2jax.model import Transformer

CONFIG = k2jax.ModelConfig.preset("tiny").replace(dtype="float32")
# Jitted: op by op, the MoE's expert loop makes an eager forward slow on CPU.
logits = jax.jit(k2jax.logits, static_argnums=0, static_argnames="serving_layout")


@pytest.fixture(scope="module")
def params():
    return k2jax.init_params(CONFIG, jax.random.key(0))


def test_packed_documents_equal_separate_forwards(params):
    """Two documents packed in one row (segment ids, positions restarting) = two forwards."""
    doc_a = jax.random.randint(jax.random.key(1), (1, 13), 0, CONFIG.vocab_size)
    doc_b = jax.random.randint(jax.random.key(2), (1, 19), 0, CONFIG.vocab_size)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    positions = jnp.concatenate([jnp.arange(13), jnp.arange(19)])[None]
    segments = jnp.concatenate([jnp.zeros(13, jnp.int32), jnp.ones(19, jnp.int32)])[None]
    got = logits(CONFIG, params, packed, positions, segments)
    want = jnp.concatenate([logits(CONFIG, params, doc_a),
                            logits(CONFIG, params, doc_b)], axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_gradients_reach_weights_but_not_router_bias(params):
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, CONFIG.vocab_size)

    def loss(p):
        out = logits(CONFIG, p, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out),
                                             tokens[:, 1:, None], -1))

    grads = jax.grad(loss)(params)
    moe = grads["moe_layers"]["mlp"]
    assert float(jnp.abs(moe["gate"]["e_score_correction_bias"]).max()) == 0.0
    for leaf in (moe["gate"]["kernel"], moe["experts"]["gate_proj"]["kernel"],
                 grads["dense_layers"]["self_attn"]["kv_b_proj"]["kernel"],
                 grads["embed_tokens"]["embedding"]):
        assert np.isfinite(np.asarray(leaf)).all() and float(jnp.abs(leaf).max()) > 0


def test_bfloat16_forward_tracks_float32(params):
    config16 = CONFIG.replace(dtype="bfloat16")
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    params16["moe_layers"]["mlp"]["gate"] = params["moe_layers"]["mlp"]["gate"]  # f32 router
    tokens = jax.random.randint(jax.random.key(4), (2, 24), 0, CONFIG.vocab_size)
    ref = np.asarray(logits(CONFIG, params, tokens))
    got = logits(config16, params16, tokens)
    assert got.dtype == jnp.float32
    # bf16 rounding flips a few near-tied expert choices, so compare in aggregate.
    err = np.abs(np.asarray(got) - ref).mean() / np.abs(ref).mean()
    assert err < 0.03, err
    assert np.corrcoef(np.asarray(got).ravel(), ref.ravel())[0, 1] > 0.998


def test_int4_experts_forward_equals_dequantized():
    config = CONFIG.replace(quantized_linears=("routed_experts",))
    qparams = k2jax.init_params(config, jax.random.key(5))
    kernel = qparams["moe_layers"]["mlp"]["experts"]["down_proj"]["kernel"]
    assert isinstance(kernel, k2jax.QuantizedWeight) and kernel.values.dtype == jnp.int4
    dense = jax.tree.map(lambda w: k2jax.dequantize(w, jnp.float32)
                         if isinstance(w, k2jax.QuantizedWeight) else w, qparams,
                         is_leaf=lambda w: isinstance(w, k2jax.QuantizedWeight))
    tokens = jax.random.randint(jax.random.key(6), (2, 10), 0, CONFIG.vocab_size)
    np.testing.assert_allclose(np.asarray(logits(config, qparams, tokens)),
                               np.asarray(logits(CONFIG, dense, tokens)),
                               rtol=1e-5, atol=1e-5)


def test_remat_does_not_change_the_forward(params):
    tokens = jax.random.randint(jax.random.key(7), (1, 12), 0, CONFIG.vocab_size)
    plain = Transformer(CONFIG).apply({"params": params}, tokens)[0]
    remat = Transformer(CONFIG, remat_policy="nothing_saveable").apply({"params": params},
                                                                       tokens)[0]
    np.testing.assert_allclose(np.asarray(plain), np.asarray(remat), rtol=1e-6, atol=1e-6)


def test_param_axes_cover_every_leaf():
    shapes = k2jax.param_shapes(CONFIG)
    axes = k2jax.param_axes(CONFIG)
    leaves_s, tree_s = jax.tree.flatten(shapes)
    leaves_a = tree_s.flatten_up_to(axes)
    for shape, names in zip(leaves_s, leaves_a):
        assert len(names) == len(shape.shape), (shape, names)
    assert axes["moe_layers"]["mlp"]["experts"]["gate_proj"]["kernel"] == (
        "layers", "expert", "embed", "expert_mlp")


@pytest.mark.parametrize("quantized", [(), ("attention", "routed_experts", "lm_head")],
                         ids=["float", "int4"])
def test_serving_layout_holds_the_same_weights_and_forward(quantized):
    config = CONFIG.replace(quantized_linears=quantized)
    params = k2jax.init_params(config, jax.random.key(8))
    serving = k2jax.to_serving_layout(params)
    layers = serving["moe_layers"]
    assert sorted(layers) == [str(i) for i in range(config.num_moe_layers)]
    kv_b = layers["1"]["self_attn"]["kv_b_proj"]["kernel"]
    head = serving["lm_head"]["kernel"]
    if quantized:  # INT4 kernels keep the format's [in, out] orientation
        assert isinstance(kv_b, k2jax.QuantizedWeight) and isinstance(head, k2jax.QuantizedWeight)
    else:
        np.testing.assert_array_equal(
            kv_b, params["moe_layers"]["self_attn"]["kv_b_proj"]["kernel"][1].T)
        assert head.shape == (config.vocab_size, config.hidden_size)
    back = k2jax.from_serving_layout(serving)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    tokens = jax.random.randint(jax.random.key(9), (2, 11), 0, config.vocab_size)
    np.testing.assert_allclose(
        np.asarray(logits(config, serving, tokens, serving_layout=True)),
        np.asarray(logits(config, params, tokens)), rtol=1e-5, atol=1e-5)
