"""K2.5-style wrapper checkpoints (`KimiK25ForConditionalGeneration`): the language model under
`language_model.` with its config as `text_config`, beside a vision tower and projector.

A tiny one is built here from a random HF `DeepseekV3ForCausalLM` (K2.5's text settings: YaRN
beta_fast 32, rms_norm_eps 1e-5) plus random vision tensors. It converts to the text model,
reports what it leaves out, and its float32 logits equal those of HF's `DeepseekV3ForCausalLM`
built from the wrapper's `text_config` (max |ours - hf| <= 1e-4 max |hf|, as test_to_orbax.py).
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import k2jax
from convert.reader import ConversionError
from convert.to_orbax import PROVENANCE_FILE, convert_to_orbax
from k2jax.checkpoint import load
from tests.convert import hub
from tests.convert.conftest import K2
from tests.hf_reference import hf_logits, hub_state_dict, random_hf_model

RTOL = 1e-4
TEXT = K2.replace(rms_norm_eps=1e-5)
VISION = {"vision_tower.patch_embed.proj.weight": (16, 3, 2, 2),
          "vision_tower.encoder.blocks.0.wqkv.weight": (48, 16),
          "vision_tower.encoder.final_layernorm.weight": (16,),
          "mm_projector.proj.0.weight": (64, 64), "mm_projector.proj.2.weight": (64, 64)}


def _write_wrapper(directory, model, tensors: dict, quantization_config=None) -> dict:
    """A wrapper checkpoint of `tensors` (hub names of the text model) and random vision ones."""
    generator = torch.Generator().manual_seed(3)
    wrapped = {hub_name: t for hub_name, t in (
        [("language_model." + name, t) for name, t in tensors.items()]
        + [(name, torch.randn(shape, generator=generator)) for name, shape in VISION.items()])}
    hub.write_hub(directory, wrapped, model)
    text_config = model.config.to_dict()
    text_config.update(architectures=["DeepseekV3ForCausalLM"], model_type="kimi_k2")
    if quantization_config:
        text_config["quantization_config"] = quantization_config
    config = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
              "bos_token_id": TEXT.bos_token_id, "eos_token_id": TEXT.eos_token_id,
              "media_placeholder_token_id": 7, "tie_word_embeddings": False,
              "text_config": text_config,
              "vision_config": {"patch_size": 2, "vt_hidden_size": 16, "mm_hidden_size": 16,
                                "text_hidden_size": TEXT.hidden_size}}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config


@pytest.fixture(scope="module")
def text_model():
    return random_hf_model(TEXT, seed=5)


def test_wrapper_converts_its_language_model_and_matches_hf(text_model, tmp_path):
    source = tmp_path / "k25"
    wrapper = _write_wrapper(source, text_model, hub_state_dict(text_model))
    notes = []
    config = convert_to_orbax(source, tmp_path / "ckpt", progress=False, log=notes.append)
    assert config == TEXT.replace(model_type="kimi_k2")
    assert config.rms_norm_eps == 1e-5 and config.rope_scaling.beta_fast == 32.0
    (note,) = [n for n in notes if "leaving out" in n]
    assert "KimiK25ForConditionalGeneration" in note
    assert "vision_tower (3 tensors" in note and "mm_projector (2 tensors" in note
    with open(tmp_path / "ckpt" / PROVENANCE_FILE) as f:
        left_out = json.load(f)["left_out"]
    assert {module: count for module, (count, _) in left_out.items()} == {
        "mm_projector": 2, "vision_tower": 3}

    reference = DeepseekV3ForCausalLM(DeepseekV3Config(**wrapper["text_config"])).float().eval()
    reference.config._attn_implementation = "eager"
    reference.load_state_dict(text_model.state_dict(), strict=True)
    loaded, params = load(tmp_path / "ckpt")
    tokens = np.random.default_rng(0).integers(0, loaded.vocab_size, (2, 40))
    got = np.asarray(k2jax.logits(loaded, params, jnp.asarray(tokens, jnp.int32)))
    expected = hf_logits(reference, tokens)
    assert np.abs(got - expected).max() <= RTOL * np.abs(expected).max()


def test_wrapper_with_int4_experts_reads_the_text_quantization(text_model, tmp_path):
    tensors = hub.int4_experts(hub.bf16(hub_state_dict(text_model)))
    _write_wrapper(tmp_path / "k25", text_model, tensors, hub.K2_THINKING_QUANTIZATION)
    config = convert_to_orbax(tmp_path / "k25", tmp_path / "ckpt", progress=False,
                              log=lambda _: None)
    assert config.quantized_linears == ("routed_experts",)
    _, params = load(tmp_path / "ckpt")
    kernel = params["moe_layers"]["mlp"]["experts"]["down_proj"]["kernel"]
    assert isinstance(kernel, k2jax.QuantizedWeight)


def test_wrapper_problems_name_the_stored_tensors(text_model, tmp_path):
    tensors = hub_state_dict(text_model)
    del tensors["model.norm.weight"]
    tensors["model.layers.0.mlp.gate_proj.weight"] = tensors[
        "model.layers.0.mlp.gate_proj.weight"][:, :-1]
    _write_wrapper(tmp_path / "k25", text_model, tensors)
    with pytest.raises(ConversionError) as error:
        convert_to_orbax(tmp_path / "k25", tmp_path / "ckpt", progress=False)
    problems = "\n".join(error.value.problems)
    assert "missing tensor language_model.model.norm.weight" in problems
    assert "language_model.model.layers.0.mlp.gate_proj.weight: shape" in problems
    assert not os.path.exists(tmp_path / "ckpt")
