"""Hub -> k2jax checkpoint: values and logits against HF transformers and compressed-tensors.

float32 logits agree with HF's to 1e-4 of the largest logit (max |ours - hf| <= 1e-4 max |hf|);
stored values are compared bit for bit.
"""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import torch
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme

import k2jax
from convert.to_orbax import convert_to_orbax
from k2jax.checkpoint import PARAMS_DIR, leaf_paths, load
from tests.convert import hub
from tests.hf_reference import hf_logits, hub_state_dict, params_from_hf_model

RTOL = 1e-4


def _tokens(config, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (2, 40))


def _rel_err(got, expected):
    return np.abs(got - expected).max() / np.abs(expected).max()


def _bits(x):
    """The array's bit patterns (bf16 and int4 compare exactly, NaN or not)."""
    x = np.asarray(x)
    return x.view(f"u{x.dtype.itemsize}")


def _torch_bits(t):
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def _assert_trees_equal(got, expected):
    got, expected = leaf_paths(got), leaf_paths(expected)
    assert got.keys() == expected.keys()
    for path in got:
        a, b = np.asarray(got[path]), np.asarray(expected[path])
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg="/".join(path))


def _ct_decompress(tensors, module, scale_dtype=None):
    """compressed-tensors' own decompression of one hub linear: `[out, in]` torch tensor."""
    scale = tensors[f"{module}.weight_scale"]
    state = {"weight_packed": tensors[f"{module}.weight_packed"],
             "weight_scale": scale if scale_dtype is None else scale.to(scale_dtype),
             "weight_shape": tensors[f"{module}.weight_shape"]}
    scheme = QuantizationScheme(targets=["Linear"], weights=hub.INT4_ARGS)
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]


def test_float32_source_matches_hf_logits(dsv3_hub, tmp_path):
    config = convert_to_orbax(dsv3_hub.path, tmp_path / "ckpt", progress=False)
    assert config.dtype == "float32" and config.model_type == "deepseek_v3"
    loaded_config, params = load(tmp_path / "ckpt")
    assert loaded_config == config
    _assert_trees_equal(params, params_from_hf_model(config, dsv3_hub.model))
    tokens = _tokens(config)
    got = np.asarray(k2jax.logits(config, params, jnp.asarray(tokens, jnp.int32)))
    assert _rel_err(got, hf_logits(dsv3_hub.model, tokens)) <= RTOL


def test_single_file_checkpoint(dsv3_hub, tmp_path):
    """A directory with one `model.safetensors` and no index converts the same."""
    dsv3_hub.model.save_pretrained(tmp_path / "hub")
    assert sorted(os.listdir(tmp_path / "hub")) == ["config.json", "generation_config.json",
                                                    "model.safetensors"]
    config = convert_to_orbax(tmp_path / "hub", tmp_path / "ckpt", progress=False)
    _, params = load(tmp_path / "ckpt")
    _assert_trees_equal(params, params_from_hf_model(config, dsv3_hub.model))


def test_bf16_source_is_stored_bit_exactly(k2_hub, tmp_path):
    config = convert_to_orbax(k2_hub.path, tmp_path / "ckpt", progress=False)
    assert config.dtype == "bfloat16" and not config.quantized_linears
    _, params = load(tmp_path / "ckpt")
    expected = params_from_hf_model(config, k2_hub.model)
    # The hub holds the model rounded to bf16, except the float32 router.
    expected = jax.tree_util.tree_map_with_path(
        lambda p, x: x if "['gate']" in jax.tree_util.keystr(p)
        else x.astype(ml_dtypes.bfloat16), expected)
    _assert_trees_equal(params, expected)


def test_int4_experts_are_kept_bit_exactly(k2_int4_hub, tmp_path):
    config = convert_to_orbax(k2_int4_hub.path, tmp_path / "ckpt", progress=False)
    assert config.quantized_linears == ("routed_experts",)
    _, params = load(tmp_path / "ckpt")
    experts = params["moe_layers"]["mlp"]["experts"]
    k = config.first_k_dense_replace
    for proj in ("gate_proj", "up_proj", "down_proj"):
        qw = experts[proj]["kernel"]
        assert isinstance(qw, k2jax.QuantizedWeight) and qw.values.dtype == jnp.int4
        for layer in range(config.num_moe_layers):
            for e in range(config.n_routed_experts):
                module = f"model.layers.{layer + k}.mlp.experts.{e}.{proj}"
                scale = k2_int4_hub.tensors[f"{module}.weight_scale"]
                # values * scale in float32 is exact; compressed-tensors' reference.
                w = _ct_decompress(k2_int4_hub.tensors, module, torch.float32).numpy()
                np.testing.assert_array_equal(_bits(qw.scale[layer, e]), _torch_bits(scale.T))
                np.testing.assert_array_equal(
                    np.asarray(k2jax.dequantize(jax.tree.map(lambda a: a[layer, e], qw),
                                                jnp.float32)), w.T)


def test_int4_logits_match_dequantized_reference(k2_int4_hub, tmp_path):
    """k2jax running INT4 in float32 == HF running compressed-tensors' dequantized weights."""
    convert_to_orbax(k2_int4_hub.path, tmp_path / "ckpt", progress=False)
    config, params = load(tmp_path / "ckpt")
    tensors = k2_int4_hub.tensors
    weights = {}
    for name in hub_state_dict(k2_int4_hub.model):
        if name + "_packed" in tensors:
            weights[name] = _ct_decompress(tensors, name[: -len(".weight")], torch.float32)
        else:
            weights[name] = tensors[name].float()
    reference = hub.hf_model_with(k2_int4_hub.model, weights)
    is_qw = lambda x: isinstance(x, k2jax.QuantizedWeight)  # noqa: E731
    config32 = config.replace(dtype="float32")
    params32 = jax.tree.map(lambda x: x if is_qw(x) else x.astype(jnp.float32), params,
                            is_leaf=is_qw)
    tokens = _tokens(config, seed=1)
    got = np.asarray(k2jax.logits(config32, params32, jnp.asarray(tokens, jnp.int32)))
    assert _rel_err(got, hf_logits(reference, tokens)) <= RTOL


def test_int4_dequantized_with_dtype(k2_int4_hub, tmp_path):
    config = convert_to_orbax(k2_int4_hub.path, tmp_path / "ckpt", dtype="bfloat16",
                              progress=False)
    assert not config.quantized_linears
    _, params = load(tmp_path / "ckpt")
    kernel = params["moe_layers"]["mlp"]["experts"]["down_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    module = f"model.layers.{config.first_k_dense_replace + 1}.mlp.experts.5.down_proj"
    w = _ct_decompress(k2_int4_hub.tensors, module)  # bf16, compressed-tensors' rounding
    np.testing.assert_array_equal(_bits(kernel[1, 5]), _torch_bits(w.T))


def test_fp8_blocks_are_dequantized(fp8_hub, tmp_path):
    config = convert_to_orbax(fp8_hub.path, tmp_path / "ckpt", progress=False)
    _, params = load(tmp_path / "ckpt")
    checked = 0
    for name, t in fp8_hub.tensors.items():
        if not name.endswith("_scale_inv") or ".experts." not in name:
            continue
        weight = fp8_hub.tensors[name[: -len("_scale_inv")]].float()
        full = t.repeat_interleave(32, 0).repeat_interleave(32, 1)
        expected = (weight * full[: weight.shape[0], : weight.shape[1]]).to(torch.bfloat16)
        layer, expert, proj = name.split(".")[2], name.split(".")[5], name.split(".")[6]
        got = params["moe_layers"]["mlp"]["experts"][proj]["kernel"][
            int(layer) - config.first_k_dense_replace, int(expert)]
        np.testing.assert_array_equal(_bits(got), _torch_bits(expected.T))
        checked += 1
    assert checked == 3 * config.num_moe_layers * config.n_routed_experts
    kv_a = params["moe_layers"]["self_attn"]["kv_a_proj_with_mqa"]["kernel"]
    assert kv_a.shape[-1] % 32 != 0  # partial edge blocks were exercised


def test_stock_orbax_restores_the_converted_tree(k2_int4_hub, tmp_path):
    convert_to_orbax(k2_int4_hub.path, tmp_path / "ckpt", progress=False)
    _, params = load(tmp_path / "ckpt")
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(tmp_path / "ckpt" / PARAMS_DIR).item_metadata.tree
        raw = ckptr.restore(tmp_path / "ckpt" / PARAMS_DIR, restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))
    got = leaf_paths(raw)
    for path, leaf in leaf_paths(params).items():
        np.testing.assert_array_equal(_bits(got[path]), _bits(leaf))


def test_load_places_leaves_on_given_shardings(k2_int4_hub, tmp_path):
    convert_to_orbax(k2_int4_hub.path, tmp_path / "ckpt", progress=False)
    _, params = load(tmp_path / "ckpt")
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    spec = jax.sharding.PartitionSpec
    expert_axis = jax.sharding.NamedSharding(mesh, spec(None, "expert"))
    replicated = jax.sharding.NamedSharding(mesh, spec())
    shardings = jax.tree_util.tree_map_with_path(
        lambda p, _: expert_axis if "experts" in jax.tree_util.keystr(p) else replicated, params)
    _, sharded = load(tmp_path / "ckpt", shardings=shardings)
    values = sharded["moe_layers"]["mlp"]["experts"]["up_proj"]["kernel"].values
    assert values.sharding == expert_axis
    assert values.addressable_shards[0].data.shape[1] == values.shape[1] // 4
    _assert_trees_equal(jax.device_get(sharded), jax.device_get(params))


def test_load_onto_a_mesh_uses_the_parameter_shardings(k2_int4_hub, tmp_path):
    from k2jax import param_sharding, sharding

    convert_to_orbax(k2_int4_hub.path, tmp_path / "ckpt", progress=False)
    config, params = load(tmp_path / "ckpt")
    mesh = sharding.make_mesh("expert=4,tensor=2")
    _, sharded = load(tmp_path / "ckpt", mesh)
    expected = param_sharding.param_shardings(config, mesh)
    got = jax.tree.map(lambda x: x.sharding, sharded)
    assert jax.tree.leaves(got) == jax.tree.leaves(expected)
    values = sharded["moe_layers"]["mlp"]["experts"]["gate_proj"]["kernel"].values
    assert values.addressable_shards[0].data.shape[1] == config.n_routed_experts // 4
    _assert_trees_equal(jax.device_get(sharded), jax.device_get(params))
