"""Bad input is reported before anything is written, naming the file and the tensor."""

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert.reader import ConversionError
from convert.to_orbax import convert_to_orbax

INDEX = "model.safetensors.index.json"


@pytest.fixture
def hub_copy(k2_hub, tmp_path):
    path = str(tmp_path / "hub")
    shutil.copytree(k2_hub.path, path)
    return path


def _index(path):
    with open(os.path.join(path, INDEX)) as f:
        return json.load(f)


def _write_index(path, index):
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump(index, f)


def _edit_shard(path, tensor, edit):
    """Applies `edit(tensors)` to the shard holding `tensor`; returns the shard's file name."""
    file = _index(path)["weight_map"][tensor]
    tensors = load_file(os.path.join(path, file))
    edit(tensors)
    save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    return file


def _convert_fails(path, tmp_path, *patterns, before_writing=True):
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        convert_to_orbax(path, out, progress=False)
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    assert not os.path.exists(out)
    assert os.path.exists(f"{out}.partial") != before_writing
    return str(info.value)


def test_missing_tensor(hub_copy, tmp_path):
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    _edit_shard(hub_copy, name, lambda t: t.pop(name))
    index = _index(hub_copy)
    del index["weight_map"][name]
    _write_index(hub_copy, index)
    _convert_fails(hub_copy, tmp_path, f"{INDEX}: missing tensor {name} (F32/BF16/F16[32, 64], "
                   "for moe_layers/mlp/experts/up_proj/kernel)")


def test_unexpected_tensor(hub_copy, tmp_path):
    name, extra = "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.bias"
    file = _edit_shard(hub_copy, name, lambda t: t.update({extra: torch.zeros(8)}))
    index = _index(hub_copy)
    index["weight_map"][extra] = file
    _write_index(hub_copy, index)
    _convert_fails(hub_copy, tmp_path, f"{file}: {extra}: unexpected tensor")


def test_wrong_shape(hub_copy, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"
    file = _edit_shard(hub_copy, name, lambda t: t.update({name: torch.zeros(64, 63)}))
    _convert_fails(hub_copy, tmp_path, f"{file}: {name}: shape [64, 63], config.json implies "
                   "[64, 64]")


def test_wrong_dtype(hub_copy, tmp_path):
    name = "model.norm.weight"
    file = _edit_shard(hub_copy, name,
                       lambda t: t.update({name: torch.ones(64, dtype=torch.int32)}))
    _convert_fails(hub_copy, tmp_path, f"{file}: {name}: dtype I32, expected F32 or BF16 or F16")


def test_truncated_shard(hub_copy, tmp_path):
    file = sorted(f for f in os.listdir(hub_copy) if f.endswith(".safetensors"))[-1]
    path = os.path.join(hub_copy, file)
    os.truncate(path, os.path.getsize(path) - 10)
    _convert_fails(hub_copy, tmp_path, f"{file}: ", ": truncated: the tensor ends at byte")


def test_corrupt_header(hub_copy, tmp_path):
    file = sorted(f for f in os.listdir(hub_copy) if f.endswith(".safetensors"))[1]
    with open(os.path.join(hub_copy, file), "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    _convert_fails(hub_copy, tmp_path, f"{file}: corrupt: the safetensors header is not a JSON")
    with open(os.path.join(hub_copy, file), "r+b") as f:
        f.write((1 << 40).to_bytes(8, "little"))
    _convert_fails(hub_copy, tmp_path, f"{file}: truncated or corrupt: header length")


def test_index_entry_naming_the_wrong_shard(hub_copy, tmp_path):
    index = _index(hub_copy)
    name = "model.layers.0.mlp.up_proj.weight"
    actual = index["weight_map"][name]
    other = next(f for f in index["weight_map"].values() if f != actual)
    index["weight_map"][name] = other
    _write_index(hub_copy, index)
    _convert_fails(hub_copy, tmp_path, f"{INDEX}: {name} is indexed in {other} but lies in "
                   f"{actual}")


def test_index_entry_naming_an_absent_tensor(hub_copy, tmp_path):
    index = _index(hub_copy)
    file = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = file
    _write_index(hub_copy, index)
    _convert_fails(hub_copy, tmp_path, f"{INDEX}: model.layers.0.mlp.extra.weight is indexed "
                   f"in {file}, which has no such tensor")


def test_tensor_missing_from_index(hub_copy, tmp_path):
    index = _index(hub_copy)
    name = "model.layers.0.input_layernorm.weight"
    file = index["weight_map"].pop(name)
    _write_index(hub_copy, index)
    _convert_fails(hub_copy, tmp_path, f"{file}: {name} is missing from {INDEX}")


def test_missing_shard_file(hub_copy, tmp_path):
    file = _index(hub_copy)["weight_map"]["model.norm.weight"]
    os.remove(os.path.join(hub_copy, file))
    _convert_fails(hub_copy, tmp_path, f"{INDEX}: shard {file} (holding ", ") does not exist")


def test_several_problems_are_reported_together(hub_copy, tmp_path):
    shards = sorted(f for f in os.listdir(hub_copy) if f.endswith(".safetensors"))
    os.truncate(os.path.join(hub_copy, shards[0]), 100)
    os.remove(os.path.join(hub_copy, shards[-1]))
    message = _convert_fails(hub_copy, tmp_path, shards[0], shards[-1])
    assert "; " in message


class _RunsCode:
    """Unpickling this creates a file: proof that the loader executed the pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_are_refused_unopened(k2_hub, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(os.path.join(k2_hub.path, "config.json"), path)
    marker = tmp_path / "unpickled"
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump(_RunsCode(str(marker)), f)
    message = _convert_fails(str(path), tmp_path, "pytorch_model.bin is a pickle-based "
                             "checkpoint", "unpickling executes arbitrary code")
    assert "safetensors" in message and not marker.exists()


def test_index_naming_pickle_shards_is_refused(hub_copy, tmp_path):
    index = _index(hub_copy)
    index["weight_map"]["lm_head.weight"] = "pytorch_model-00001-of-00002.bin"
    _write_index(hub_copy, index)
    _convert_fails(hub_copy, tmp_path, "pytorch_model-00001-of-00002.bin is a pickle-based")


def _add_mtp_layer(path):
    name = "model.layers.3.eh_proj.weight"
    file = _edit_shard(path, "lm_head.weight", lambda t: t.update({
        name: torch.zeros(64, 128), "model.layers.3.enorm.weight": torch.ones(64)}))
    index = _index(path)
    index["weight_map"].update({name: file, "model.layers.3.enorm.weight": file})
    _write_index(path, index)


def test_multi_token_prediction_layer_is_skipped_with_a_note(hub_copy, tmp_path):
    _add_mtp_layer(hub_copy)
    config_path = os.path.join(hub_copy, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["num_nextn_predict_layers"] = 0
    with open(config_path, "w") as f:
        json.dump(config, f)
    _convert_fails(hub_copy, tmp_path, "model.layers.3.eh_proj.weight: unexpected tensor")
    config["num_nextn_predict_layers"] = 1
    with open(config_path, "w") as f:
        json.dump(config, f)
    notes = []
    convert_to_orbax(hub_copy, tmp_path / "out", progress=False, log=notes.append)
    assert notes == ["skipping 2 tensors of layers past num_hidden_layers=3 (multi-token "
                     "prediction, which k2jax does not run)"]


def test_int4_weight_shape_disagreeing_with_config(k2_int4_hub, tmp_path):
    path = str(tmp_path / "hub")
    shutil.copytree(k2_int4_hub.path, path)
    name = "model.layers.2.mlp.experts.1.down_proj.weight_shape"
    file = _edit_shard(path, name, lambda t: t.update({name: torch.tensor([56, 32])}))
    _convert_fails(path, tmp_path, f"{file}: {name}: [56, 32], config.json implies [64, 32]")


def test_int4_scale_that_bf16_cannot_hold(k2_int4_hub, tmp_path):
    """Only the values show it, so this one surfaces while converting that tensor."""
    path = str(tmp_path / "hub")
    shutil.copytree(k2_int4_hub.path, path)
    name = "model.layers.1.mlp.experts.0.up_proj.weight_scale"
    file = _edit_shard(path, name, lambda t: t.update(
        {name: t[name].float() * (1 + 2**-12)}))
    _convert_fails(path, tmp_path, f"{file}: model.layers.1.mlp.experts.0.up_proj: "
                   "weight_scale is float32 and not exactly bfloat16; convert with --dtype "
                   "bfloat16", before_writing=False)
