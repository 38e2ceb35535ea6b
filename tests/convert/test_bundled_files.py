"""Self-contained checkpoints: a Kimi K2 style hub directory (tokenizer, chat template,
generation config, custom code named by `auto_map`) converts to a checkpoint that serves on its
own and exports to a directory transformers loads, every non-weight file byte-identical."""

import argparse
import json
import os
import shutil
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

from convert.to_hf import convert_to_hf
from convert.to_orbax import convert_to_orbax
from k2jax.checkpoint import save
from k2jax.text.testing import write_tiny_tiktoken_file
from tests.convert import hub
from tests.convert.conftest import K2
from tests.hf_reference import hf_logits, params_from_hf_model

# What Moonshot's Kimi-K2 config.json says (the classes live in the bundled code).
AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
# Stand-ins for Moonshot's code: transformers' own classes under K2's model type, so loading
# them through `auto_map` runs in this test without a download.
CODE = {
    "configuration_deepseek.py": (
        '"""Kimi K2 config (test stand-in)."""\n'
        "from transformers import DeepseekV3Config as _Config\n\n\n"
        "class DeepseekV3Config(_Config):\n    model_type = \"kimi_k2\"\n"),
    "modeling_deepseek.py": (
        '"""Kimi K2 model (test stand-in)."""\n'
        "from transformers import DeepseekV3ForCausalLM as _ForCausalLM\n"
        "from transformers import DeepseekV3Model as _Model\n"
        "from transformers import conversion_mapping\n\n"
        "from .configuration_deepseek import DeepseekV3Config\n\n"
        "# Moonshot's code has a module per expert, as the hub names them; transformers' fused\n"
        "# experts read those names through its deepseek_v3 renaming.\n"
        "conversion_mapping.register_checkpoint_conversion_mapping(\n"
        "    'kimi_k2', conversion_mapping.get_checkpoint_conversion_mapping('deepseek_v3'),\n"
        "    overwrite=True)\n\n\n"
        "class DeepseekV3Model(_Model):\n    config_class = DeepseekV3Config\n\n\n"
        "class DeepseekV3ForCausalLM(_ForCausalLM):\n    config_class = DeepseekV3Config\n"),
    "tokenization_kimi.py": '"""Kimi tokenizer (test stand-in)."""\n\n\nclass TikTokenTokenizer:\n'
                            "    pass\n",
}
OTHER_FILES = {
    "tokenizer_config.json": json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "model_max_length": 4096}, indent=2),
    "chat_template.jinja": "{% for m in messages %}<|im_{{ m.role }}|>{{ m.role }}<|im_middle|>"
                           "{{ m.content }}<|im_end|>{% endfor %}"
                           "<|im_assistant|>assistant<|im_middle|>\n",
    "generation_config.json": json.dumps({"bos_token_id": 0, "eos_token_id": 1,
                                          "temperature": 1.0, "top_p": 0.95}, indent=2),
}
BUNDLED = ["tiktoken.model", *OTHER_FILES, *CODE]


@pytest.fixture(scope="module")
def kimi_hub(k2_hub, tmp_path_factory):
    """`k2_hub` as Moonshot ships K2: `kimi_k2`, `auto_map`, tokenizer and code; `tiktoken.model`
    a symlink into a blob store, as in a hub cache snapshot."""
    root = tmp_path_factory.mktemp("kimi")
    path = root / "hub"
    shutil.copytree(k2_hub.path, path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="kimi_k2", auto_map=AUTO_MAP)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name, text in {**CODE, **OTHER_FILES}.items():
        (path / name).write_text(text)
    (root / "blobs").mkdir()
    write_tiny_tiktoken_file(root / "blobs", vocab_size=K2.vocab_size)
    os.symlink(root / "blobs" / "tiktoken.model", path / "tiktoken.model")
    (path / "README.md").write_text("not a model file\n")
    return path


@pytest.fixture(scope="module")
def kimi_ckpt(kimi_hub, tmp_path_factory):
    path = tmp_path_factory.mktemp("kimi_ckpt") / "ckpt"
    convert_to_orbax(kimi_hub, path, progress=False)
    return path


@pytest.fixture(scope="module")
def kimi_export(kimi_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("kimi_export") / "hub"
    convert_to_hf(kimi_ckpt, path, max_shard_bytes=100_000, progress=False)
    return path


def test_bundled_files_travel_byte_identical_both_ways(kimi_hub, kimi_ckpt, kimi_export,
                                                       k2_hub):
    for directory in (kimi_ckpt, kimi_export):
        for name in BUNDLED:
            assert not os.path.islink(directory / name), name
            assert (directory / name).read_bytes() == (kimi_hub / name).read_bytes(), name
        assert not (directory / "README.md").exists()
    config = json.loads((kimi_export / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "kimi_k2"
    exported = hub.read_hub(kimi_export)
    assert exported.keys() == k2_hub.tensors.keys()
    for name, t in k2_hub.tensors.items():
        assert hub.as_bytes(exported[name]) == hub.as_bytes(t), name


def test_serve_finds_the_bundled_tokenizer(kimi_ckpt):
    from serve.server_cli import load_model_and_tokenizer

    args = argparse.Namespace(checkpoint=str(kimi_ckpt), tokenizer=None, model_name=None)
    config, _, tokenizer, name = load_model_and_tokenizer(args)
    assert tokenizer.vocab_size == config.vocab_size and name == "ckpt"


def test_export_with_auto_map_loads_its_own_code(kimi_export, k2_hub, tmp_path, monkeypatch):
    # transformers copies remote code into HF_MODULES_CACHE and puts it on sys.path.
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE",
                        str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    model = AutoModelForCausalLM.from_pretrained(kimi_export, trust_remote_code=True,
                                                 dtype=torch.float32)
    assert type(model).__module__.endswith("modeling_deepseek")
    assert model.config.model_type == "kimi_k2"
    got = model.state_dict()
    for name, t in hub.fused_state_dict(k2_hub.tensors).items():
        assert torch.equal(got[name], t.float()), name


def test_export_without_code_loads_as_deepseek_v3(k2_model, tmp_path):
    """A `kimi_k2` checkpoint with no code (saved from the tiny preset) exports as
    transformers' own `deepseek_v3`, with the source model's logits."""
    assert K2.model_type == "kimi_k2"
    save(tmp_path / "ckpt", K2, params_from_hf_model(K2, k2_model))
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hub", progress=False)
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "auto_map" not in config
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hub", dtype=torch.float32)
    assert type(model) is DeepseekV3ForCausalLM
    model.config._attn_implementation = "eager"
    tokens = torch.randint(0, K2.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    assert (hf_logits(model, tokens.numpy()) == hf_logits(k2_model, tokens.numpy())).all()


def test_auto_map_without_its_code_is_not_exported(kimi_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(kimi_ckpt, ckpt)
    os.remove(ckpt / "modeling_deepseek.py")
    convert_to_hf(ckpt, tmp_path / "hub", progress=False)
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and "auto_map" not in config
    assert (tmp_path / "hub" / "configuration_deepseek.py").exists()


def test_rerun_adds_files_missing_from_an_older_conversion(kimi_hub, kimi_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(kimi_ckpt, ckpt)
    for name in ("tiktoken.model", "chat_template.jinja"):
        os.remove(ckpt / name)
    (ckpt / "generation_config.json").write_text("{}\n")  # edited by its owner: kept
    notes = []
    convert_to_orbax(kimi_hub, ckpt, progress=False, log=notes.append)
    assert notes == [f"{ckpt} already holds this conversion; added chat_template.jinja, "
                     "tiktoken.model"]
    assert (ckpt / "tiktoken.model").read_bytes() == (kimi_hub / "tiktoken.model").read_bytes()
    assert (ckpt / "generation_config.json").read_text() == "{}\n"
