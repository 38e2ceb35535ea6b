"""k2jax checkpoint -> hub: byte-identical round trips, and directories HF transformers and
compressed-tensors read as their own."""

import json
import os
import re

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from transformers import DeepseekV3ForCausalLM

import k2jax
from convert.to_hf import convert_to_hf
from convert.to_orbax import convert_to_orbax
from k2jax.checkpoint import CheckpointError, save
from tests.convert import hub


@pytest.mark.parametrize("source", ["k2_hub", "k2_int4_hub"])
def test_round_trip_is_byte_identical(source, request, tmp_path):
    original = request.getfixturevalue(source)
    convert_to_orbax(original.path, tmp_path / "ckpt", progress=False)
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hub", max_shard_bytes=100_000, progress=False)
    assert len(os.listdir(tmp_path / "hub")) > 3  # several shards
    exported = hub.read_hub(tmp_path / "hub")
    assert exported.keys() == original.tensors.keys()
    for name, t in original.tensors.items():
        assert exported[name].dtype == t.dtype and exported[name].shape == t.shape, name
        assert hub.as_bytes(exported[name]) == hub.as_bytes(t), name
    assert (k2jax.ModelConfig.from_hf(tmp_path / "hub")
            == k2jax.ModelConfig.from_hf(original.path))


def test_int4_export_is_k2_thinkings_compressed_tensors_format(k2_int4_hub, tmp_path):
    convert_to_orbax(k2_int4_hub.path, tmp_path / "ckpt", progress=False)
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hub", progress=False)
    with open(tmp_path / "hub" / "config.json") as f:
        qc = json.load(f)["quantization_config"]
    assert qc == hub.K2_THINKING_QUANTIZATION
    parsed = QuantizationConfig.model_validate(qc)
    weights = parsed.config_groups["group_0"].weights
    assert parsed.format == "pack-quantized"
    assert (weights.num_bits, weights.strategy, weights.group_size, weights.symmetric) == (
        4, "group", 32, True)


def test_bf16_export_loads_in_transformers(dsv3_hub, tmp_path):
    convert_to_orbax(dsv3_hub.path, tmp_path / "ckpt", dtype="bfloat16", progress=False)
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hub", max_shard_bytes=200_000,
                  progress=False)
    model = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hub")
    assert model.dtype == torch.bfloat16
    expected = dsv3_hub.model.state_dict()
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        want = t if name.endswith(("gate.weight", "e_score_correction_bias")) \
            else t.to(torch.bfloat16)
        assert torch.equal(got[name].to(want.dtype), want), name


def test_export_of_a_saved_checkpoint(k2_int4_hub, tmp_path):
    """`save` (Orbax's own OCDBT layout) exports as well as a converted checkpoint does."""
    convert_to_orbax(k2_int4_hub.path, tmp_path / "converted", progress=False)
    config, params = k2jax.load(tmp_path / "converted")
    save(tmp_path / "saved", config, params)
    assert (tmp_path / "saved" / "params" / "manifest.ocdbt").exists()
    convert_to_hf(tmp_path / "saved", tmp_path / "hub", progress=False)
    exported = hub.read_hub(tmp_path / "hub")
    assert exported.keys() == k2_int4_hub.tensors.keys()
    for name, t in k2_int4_hub.tensors.items():
        assert hub.as_bytes(exported[name]) == hub.as_bytes(t), name


def test_arrays_that_do_not_match_config_are_refused(k2_hub, tmp_path):
    convert_to_orbax(k2_hub.path, tmp_path / "ckpt", progress=False)
    path = tmp_path / "ckpt" / "config.json"
    config = json.loads(path.read_text())
    config["n_routed_experts"] = 16
    path.write_text(json.dumps(config))
    message = ("parameters do not match config.json: moe_layers/mlp/experts/down_proj/kernel "
               "is bfloat16[2, 8, 32, 64], the config implies bfloat16[2, 16, 32, 64]")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        convert_to_hf(tmp_path / "ckpt", tmp_path / "hub", progress=False)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        k2jax.load(tmp_path / "ckpt")
