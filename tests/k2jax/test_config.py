"""ModelConfig: presets, reading hub config.json in both key styles, clear rejections."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import k2jax
from k2jax import ConfigError, ModelConfig
from tests.convert.hub import K2_THINKING_QUANTIZATION

# Kimi-K2-Thinking's config.json as published (old key style), abridged to the model fields.
K2_THINKING_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 0,
    "num_attention_heads": 64, "num_key_value_heads": 64, "n_shared_experts": 1,
    "n_routed_experts": 384, "ep_size": 1, "routed_scaling_factor": 2.827, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 8,
    "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 262144, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
    "use_cache": True, "pad_token_id": 163839, "bos_token_id": 163584, "eos_token_id": 163585,
    "pretraining_tp": 1, "tie_word_embeddings": False, "rope_theta": 50000.0,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3",
    "quantization_config": K2_THINKING_QUANTIZATION,
}


def test_k2_thinking_json_reads_as_the_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(K2_THINKING_JSON))
    config = ModelConfig.from_hf(tmp_path)
    assert config.quantized_linears == ("routed_experts",)
    assert config.quant_group_size == 32
    assert config.rope_scaling.factor == 64.0 and config.rope_scaling.beta_fast == 1.0
    assert config == ModelConfig.preset("kimi-k2-thinking")


# Kimi-K2.5's config.json: the text model of K2's shape (YaRN beta_fast 32, rms_norm_eps 1e-5)
# as `text_config` of a multimodal wrapper, abridged; its INT4 ignore list covers everything but
# the routed experts, in patterns that match with or without the `language_model.` prefix.
K25_QUANTIZATION = {**K2_THINKING_QUANTIZATION, "ignore": [
    "lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
    "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]}
K25_TEXT_JSON = {**{k: v for k, v in K2_THINKING_JSON.items() if k != "quantization_config"},
                 "rms_norm_eps": 1e-05, "quantization_config": K25_QUANTIZATION,
                 "rope_scaling": {**K2_THINKING_JSON["rope_scaling"], "beta_fast": 32.0}}
K25_JSON = {
    "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
    "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config"},
    "bos_token_id": 163584, "eos_token_id": 163585, "pad_token_id": 163839,
    "media_placeholder_token_id": 163605, "ignore_index": -100, "tie_word_embeddings": False,
    "text_config": K25_TEXT_JSON,
    "vision_config": {"patch_size": 14, "vt_hidden_size": 1152, "vt_num_hidden_layers": 27,
                      "mm_hidden_size": 1152, "text_hidden_size": 7168,
                      "mm_projector_type": "patchmerger"},
}


@pytest.mark.parametrize("where", ["text_config", "top level", "both"])
def test_k25_wrapper_config_reads_its_text_model(tmp_path, where):
    hf = json.loads(json.dumps(K25_JSON))
    if where != "text_config":
        hf["quantization_config"] = hf["text_config"]["quantization_config"]
    if where == "top level":
        del hf["text_config"]["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = ModelConfig.from_hf(tmp_path)
    assert config == ModelConfig.preset("kimi-k2.5")
    assert (config.rope_scaling.beta_fast, config.rms_norm_eps) == (32.0, 1e-5)
    assert config.quantized_linears == ("routed_experts",)
    assert ModelConfig.preset("kimi-k2.6") == ModelConfig.preset("kimi-k2.7-code") == config


def test_k25_ignore_list_written_with_the_language_model_prefix():
    prefixed = {**K25_QUANTIZATION, "ignore": ["language_model.lm_head",
                                               "re:language_model\\.model\\.layers\\.\\d+\\.self_attn.*",
                                               "re:.*shared_experts.*", "re:.*layers\\.0\\.mlp.*"]}
    hf = {**K25_JSON, "quantization_config": prefixed,
          "text_config": {k: v for k, v in K25_TEXT_JSON.items() if k != "quantization_config"}}
    assert ModelConfig.from_hf(hf).quantized_linears == ("routed_experts",)


def test_a_wrapper_without_text_config_is_refused():
    hf = {k: v for k, v in K25_JSON.items() if k != "text_config"}
    with pytest.raises(ConfigError, match="text_config is missing"):
        ModelConfig.from_hf(hf)


def test_transformers5_rope_parameters_equal_old_keys():
    old = dict(K2_THINKING_JSON)
    new = {k: v for k, v in old.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = {**{k: v for k, v in old["rope_scaling"].items() if k != "type"},
                              "rope_type": "yarn", "rope_theta": 50000.0}
    assert ModelConfig.from_hf(new) == ModelConfig.from_hf(old)


@pytest.mark.parametrize("name", ["tiny", "small", "kimi-k2-thinking", "kimi-k2-instruct",
                                  "deepseek-v3"])
def test_to_hf_round_trips(name):
    config = ModelConfig.preset(name)
    back = ModelConfig.from_hf(json.loads(json.dumps(config.to_hf())),
                               quantized_linears=config.quantized_linears)
    assert back == config


def test_untruncated_yarn_round_trips():
    config = ModelConfig.preset("tiny")
    config = config.replace(rope_scaling=dataclasses.replace(config.rope_scaling, truncate=False))
    assert ModelConfig.from_hf(config.to_hf()) == config


def test_hf_transformers_reads_our_config_and_back():
    from transformers import DeepseekV3Config

    config = ModelConfig.preset("tiny")
    hf = DeepseekV3Config(**config.to_hf()).to_dict()
    # transformers names every DeepseekV3Config model_type "deepseek_v3".
    assert ModelConfig.from_hf(hf) == config.replace(model_type="deepseek_v3")


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"model_type": "llama"}, "model_type"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"n_group": 5}, "n_group"),
    ({"topk_group": 2}, "topk_group"),
    ({"first_k_dense_replace": 62}, "first_k_dense_replace"),
    ({"max_position_embeddings": 131072}, "disagrees with max_position_embeddings"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
    ({"rope_scaling": {"type": "yarn", "factor": 64.0}}, "original_max_position_embeddings"),
    ({"some_new_field": 1}, "unknown fields ['some_new_field']"),
    ({"qk_head_dim": 100}, "qk_head_dim=100"),
    ({"quantization_config": {"quant_method": "awq"}}, "quant_method 'awq'"),
])
def test_rejects_with_the_field_named(change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(")):
        ModelConfig.from_hf({**K2_THINKING_JSON, **change})


def test_rejects_partially_ignored_group():
    qc = json.loads(json.dumps(K2_THINKING_JSON["quantization_config"]))
    qc["ignore"] = ["lm_head", "re:.*self_attn\\.q_a_proj.*", "re:.*shared_experts.*",
                    "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
    with pytest.raises(ConfigError, match="only some linears of attention"):
        ModelConfig.from_hf({**K2_THINKING_JSON, "quantization_config": qc})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.from_hf(tmp_path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'k3'"):
        ModelConfig.preset("k3")


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_full_size_param_shapes_allocate_nothing():
    """K2 at full size: 1.03T parameters, 32B active, from shapes alone."""
    config = ModelConfig.preset("kimi-k2-instruct")
    shapes = k2jax.param_shapes(config)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    experts = shapes["moe_layers"]["mlp"]["experts"]
    assert experts["gate_proj"]["kernel"].shape == (60, 384, 7168, 2048)
    total = _count(shapes)
    routed = _count(experts)
    active = total - routed + routed * 8 // 384
    assert 1.02e12 < total < 1.04e12, total
    assert 31e9 < active < 34e9, active


def test_thinking_preset_stores_int4_experts():
    shapes = k2jax.param_shapes(ModelConfig.preset("kimi-k2-thinking"))
    gate = shapes["moe_layers"]["mlp"]["experts"]["gate_proj"]["kernel"]
    assert isinstance(gate, k2jax.QuantizedWeight)
    assert gate.values.dtype == "int4" and gate.values.shape == (60, 384, 7168, 2048)
    assert gate.scale.shape == (60, 384, 7168 // 32, 2048)
    assert shapes["moe_layers"]["mlp"]["shared_experts"]["gate_proj"]["kernel"].dtype == "bfloat16"


def test_small_preset_size():
    assert 100e6 < _count(k2jax.param_shapes(ModelConfig.preset("small"))) < 300e6
