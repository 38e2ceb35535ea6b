"""QAT: the fake-quantized forward is the exported INT4 model's forward, bit for bit; the
straight-through gradient is the gradient at the quantized point (and zero for the router bias);
master weights started from an INT4 checkpoint reproduce it exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import k2jax
from k2jax import checkpoint, quant
from k2jax.model import Transformer
from tests.train.common import CONFIG, fast_jit, random_master, random_tokens
from train import qat

GROUPS = ("attention", "routed_experts")


@pytest.fixture(scope="module")
def master():
    return random_master(CONFIG)


def test_compute_params_quantizes_only_the_qat_groups(master):
    compute = qat.flat(fast_jit(lambda m: qat.compute_params(m, CONFIG, ("routed_experts",),
                                                             32))(master))
    for path, w in qat.flat(master).items():
        plain = w.astype(compute[path].dtype)
        if qat.is_qat_leaf(path, ("routed_experts",)):
            assert path[:3] == ("moe_layers", "mlp", "experts")
            snapped = quant.dequantize(quant.quantize(w, 32), compute[path].dtype)
            np.testing.assert_array_equal(np.asarray(compute[path]), np.asarray(snapped))
            assert not np.array_equal(np.asarray(compute[path]), np.asarray(plain))
        else:
            np.testing.assert_array_equal(np.asarray(compute[path]), np.asarray(plain))
    assert compute[("moe_layers", "mlp", "gate", "kernel")].dtype == jnp.float32


def _export(master):
    config = qat.export_config(CONFIG, GROUPS, "bfloat16")
    return config, fast_jit(lambda m: qat.export_params(m, CONFIG, GROUPS, "bfloat16")[1])(master)


def test_exported_int4_weights_are_the_forward_weights(master):
    config, exported = _export(master)
    assert config.quantized_linears == GROUPS
    checkpoint.check_tree(config, exported, "export")
    compute = qat.flat(fast_jit(lambda m: qat.compute_params(m, CONFIG, GROUPS, 32))(master))
    leaves = qat.flat(exported)
    assert sum(isinstance(v, quant.QuantizedWeight) for v in leaves.values()) == 2 * 5 + 3
    for path, leaf in leaves.items():
        if isinstance(leaf, quant.QuantizedWeight):
            np.testing.assert_array_equal(np.asarray(quant.dequantize(leaf, jnp.bfloat16)),
                                          np.asarray(compute[path]))


def test_qat_forward_equals_exported_int4_forward(master):
    tokens = random_tokens(CONFIG, (2, 16))
    qat_logits = fast_jit(lambda m: Transformer(CONFIG).apply(
        {"params": qat.compute_params(m, CONFIG, GROUPS, 32)}, tokens)[0])(master)
    config, exported = _export(master)
    int4_logits = fast_jit(lambda p: k2jax.logits(config, p, tokens))(exported)
    np.testing.assert_array_equal(np.asarray(qat_logits), np.asarray(int4_logits))


def test_straight_through_gradient_is_the_gradient_at_the_quantized_point(master):
    config = CONFIG.replace(dtype="float32")
    tokens = random_tokens(CONFIG, (2, 16))

    def loss(params):
        logits = Transformer(config).apply({"params": params}, tokens)[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    snapped = fast_jit(lambda m: qat.compute_params(m, config, GROUPS, 32))(master)
    through = fast_jit(jax.grad(lambda m: loss(qat.compute_params(m, config, GROUPS, 32))))(master)
    at_point = fast_jit(jax.grad(loss))(snapped)
    for path, g in qat.flat(through).items():
        np.testing.assert_array_equal(np.asarray(g), np.asarray(qat.flat(at_point)[path]),
                                      err_msg="/".join(path))
    experts = qat.flat(through)[("moe_layers", "mlp", "experts", "up_proj", "kernel")]
    assert np.abs(np.asarray(experts)).max() > 0
    # The router bias is state: the loss has no gradient with respect to it.
    bias = qat.flat(through)[("moe_layers", "mlp", "gate", "e_score_correction_bias")]
    assert not np.any(np.asarray(bias))


def test_master_from_quantized_reproduces_the_int4_checkpoint():
    w = jax.random.normal(jax.random.key(3), (4, 256, 48), jnp.float32) * 0.02
    qw = quant.quantize(w.astype(jnp.bfloat16), 32)
    groups = np.asarray(qw.values.astype(jnp.int8)).reshape(4, 8, 32, 48)
    # Groups whose extreme is -7 (the bf16 scale rounded up) need the just-under-half case.
    assert np.sum((groups.min(axis=2) == -7) & (groups.max(axis=2) < 7)) > 10
    master = qat.master_from_quantized(qw)
    again = quant.quantize(master, 32)
    np.testing.assert_array_equal(np.asarray(again.values.astype(jnp.int8)),
                                  np.asarray(qw.values.astype(jnp.int8)))
    np.testing.assert_array_equal(np.asarray(again.scale), np.asarray(qw.scale))
    np.testing.assert_array_equal(np.asarray(quant.fake_quantize(master, 32)),
                                  np.asarray(quant.dequantize(qw, jnp.float32)))
    # Plain dequantized values do not: their re-quantization moves most groups' scales.
    naive = quant.quantize(quant.dequantize(qw, jnp.float32), 32)
    assert np.mean(np.asarray(naive.scale) != np.asarray(qw.scale)) > 0.9


def test_master_params_of_an_int4_tree(master):
    config, exported = _export(master)
    again = qat.flat(fast_jit(lambda p: qat.export_params(
        qat.master_params(p), config, GROUPS, "bfloat16")[1])(exported))
    for path, leaf in qat.flat(exported).items():
        got = again[path]
        if isinstance(leaf, quant.QuantizedWeight):
            np.testing.assert_array_equal(np.asarray(got.values.astype(jnp.int8)),
                                          np.asarray(leaf.values.astype(jnp.int8)))
            np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(leaf.scale))
        else:
            assert got.dtype == leaf.dtype
            np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf))
