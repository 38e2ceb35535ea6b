"""Model configuration: one frozen dataclass with the HF `config.json` field names.

`ModelConfig.from_hf` reads a hub `config.json` (old `rope_scaling`/`rope_theta` keys or
transformers 5 `rope_parameters`), `ModelConfig.to_hf` writes it back, and
`ModelConfig.preset(name)` returns the released models and the small test/benchmark sizes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping, NamedTuple

SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
# Kimi K2.5 and later (K2.6, K2.7-Code) wrap the same text model with a vision tower and
# projector: the text model's config is `text_config`, its weights sit under `language_model.`.
WRAPPER_ARCHITECTURES = ("KimiK25ForConditionalGeneration",)
WRAPPER_MODEL_TYPES = ("kimi_k25",)
LANGUAGE_MODEL_PREFIX = "language_model."

# Groups of linears that may be stored as INT4 `QuantizedWeight`s. K2 Thinking quantizes only
# `routed_experts`; the rest stay bf16.
LINEAR_GROUPS = ("attention", "dense_mlp", "shared_experts", "routed_experts", "lm_head")

# A representative HF module name for each group, used to evaluate a compressed-tensors
# `quantization_config` (its `ignore` list is written against these names).
_HF_MODULE_EXAMPLES = {
    "attention": ("model.layers.1.self_attn.q_a_proj", "model.layers.1.self_attn.q_b_proj",
                  "model.layers.1.self_attn.q_proj",
                  "model.layers.1.self_attn.kv_a_proj_with_mqa",
                  "model.layers.1.self_attn.kv_b_proj", "model.layers.1.self_attn.o_proj"),
    "dense_mlp": ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                  "model.layers.0.mlp.down_proj"),
    "shared_experts": ("model.layers.1.mlp.shared_experts.gate_proj",
                       "model.layers.1.mlp.shared_experts.up_proj",
                       "model.layers.1.mlp.shared_experts.down_proj"),
    "routed_experts": ("model.layers.1.mlp.experts.0.gate_proj",
                       "model.layers.1.mlp.experts.0.up_proj",
                       "model.layers.1.mlp.experts.0.down_proj"),
    "lm_head": ("lm_head",),
}


EXPERT_DISPATCHES = ("auto", "dense", "ragged")
# Fields that say how to run the model, kept out of config.json.
RUNTIME_FIELDS = ("expert_dispatch", "expert_capacity_factor")

# The parameter subtrees of the two kinds of decoder layer, in run order.
STACK_NAMES = ("dense_layers", "moe_layers")


class LayerStack(NamedTuple):
    """One run of identical decoder layers: parameter subtree `name`, `count` layers."""

    name: str
    count: int
    moe: bool


class ConfigError(ValueError):
    """A config.json (or preset override) that k2jax cannot run faithfully."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN rotary scaling, as DeepSeek-V3 and Kimi K2 configure it."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True
    rope_type: str = "yarn"

    def __post_init__(self):
        if self.rope_type != "yarn":
            raise ConfigError(f"rope_scaling.type {self.rope_type!r} is not supported (only 'yarn')")
        if self.factor < 1.0:
            raise ConfigError(f"rope_scaling.factor must be >= 1, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek-V3-family model (Kimi K2, K2 Thinking, DeepSeek-V3).

    Field names follow HF `config.json`. `dtype` is the compute dtype (activations and matmul
    inputs); router logits, softmax and norms are computed in float32 regardless.
    `quantized_linears` names the groups of `LINEAR_GROUPS` stored as INT4 `QuantizedWeight`s.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int = 0
    eos_token_id: int = 1
    model_type: str = "kimi_k2"
    dtype: str = "bfloat16"
    quantized_linears: tuple[str, ...] = ()
    quant_group_size: int = 32
    initializer_range: float = 0.02
    # How the MoE layer dispatches tokens when the mesh splits the routed experts
    # (`k2jax.expert_parallel.moe_expert_parallel`): "auto", "dense" or "ragged", and None
    # (dropless) or the per-device-pair capacity as a multiple of the even share. How to run,
    # not what the model is: neither is written to or read from config.json.
    expert_dispatch: str = "auto"
    expert_capacity_factor: float | None = None

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        need(self.model_type in SUPPORTED_MODEL_TYPES,
             f"model_type {self.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                     "num_experts_per_tok", "n_group", "topk_group"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive int, got {getattr(self, name)!r}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0,
             f"q_lora_rank must be null or positive, got {self.q_lora_rank!r}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace={self.first_k_dense_replace} must lie in "
             f"[0, num_hidden_layers={self.num_hidden_layers}]")
        need(self.n_shared_experts >= 0, "n_shared_experts must be >= 0")
        need(self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(self.n_routed_experts % self.n_group == 0,
             f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        need(self.topk_group <= self.n_group,
             f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        experts_in_groups = self.topk_group * (self.n_routed_experts // self.n_group)
        need(self.num_experts_per_tok <= experts_in_groups,
             f"num_experts_per_tok={self.num_experts_per_tok} exceeds the {experts_in_groups} "
             f"experts reachable in topk_group={self.topk_group} groups")
        if self.n_group > 1:
            need(self.n_routed_experts // self.n_group >= 2,
                 "group-limited routing scores each group by its top-2 experts; "
                 "groups need at least 2 experts")
        need(self.dtype in ("bfloat16", "float32", "float16"),
             f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        unknown = set(self.quantized_linears) - set(LINEAR_GROUPS)
        need(not unknown, f"quantized_linears has unknown groups {sorted(unknown)}; "
             f"known: {LINEAR_GROUPS}")
        need(self.quant_group_size > 0, "quant_group_size must be positive")
        need(self.expert_dispatch in EXPERT_DISPATCHES,
             f"expert_dispatch must be one of {EXPERT_DISPATCHES}, got {self.expert_dispatch!r}")
        need(self.expert_capacity_factor is None or self.expert_capacity_factor > 0,
             f"expert_capacity_factor must be null or positive, got "
             f"{self.expert_capacity_factor!r}")
        rs = self.rope_scaling
        if rs is not None:
            # HF derives YaRN's frequencies from `factor` but DeepSeek-family configs also encode
            # it as max_position_embeddings / original_max_position_embeddings; disagreeing
            # values mean the checkpoint was extended inconsistently.
            implied = self.max_position_embeddings / rs.original_max_position_embeddings
            need(abs(implied - rs.factor) < 1e-6 * rs.factor,
                 f"rope_scaling.factor={rs.factor} disagrees with max_position_embeddings / "
                 f"original_max_position_embeddings = {self.max_position_embeddings} / "
                 f"{rs.original_max_position_embeddings} = {implied:g}")
        for group in self.quantized_linears:
            for name, in_dim in self._linear_in_dims(group):
                need(in_dim % self.quant_group_size == 0,
                     f"{name} input dim {in_dim} is not a multiple of quant_group_size="
                     f"{self.quant_group_size}, so it cannot be INT4")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def layer_stacks(self) -> tuple[LayerStack, ...]:
        """The non-empty stacks in run order: `first_k_dense_replace` dense layers, then MoE."""
        dense, moe = STACK_NAMES
        stacks = (LayerStack(dense, self.num_dense_layers, False),
                  LayerStack(moe, self.num_moe_layers, True))
        return tuple(stack for stack in stacks if stack.count)

    def stack_of_layer(self, layer: int) -> tuple[str, int]:
        """`(stack name, index in the stack)` of decoder layer `layer` (HF numbering)."""
        dense, moe = STACK_NAMES
        if layer < self.first_k_dense_replace:
            return dense, layer
        return moe, layer - self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def cache_width(self) -> int:
        """Values per token per layer in the absorbed-MLA latent cache."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)**2."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def is_quantized(self, group: str) -> bool:
        return group in self.quantized_linears

    def _linear_in_dims(self, group):
        n, d = self.num_attention_heads, self.hidden_size
        if group == "attention":
            dims = [("kv_a_proj_with_mqa", d), ("kv_b_proj", self.kv_lora_rank),
                    ("o_proj", n * self.v_head_dim)]
            if self.q_lora_rank:
                dims += [("q_a_proj", d), ("q_b_proj", self.q_lora_rank)]
            else:
                dims += [("q_proj", d)]
            return dims
        if group == "dense_mlp":
            return [("mlp.gate_proj", d), ("mlp.down_proj", self.intermediate_size)]
        if group == "shared_experts":
            return [("shared_experts.gate_proj", d),
                    ("shared_experts.down_proj", self.shared_intermediate_size)]
        if group == "routed_experts":
            return [("experts.gate_proj", d), ("experts.down_proj", self.moe_intermediate_size)]
        return [("lm_head", d)]

    # ---- construction ----------------------------------------------------------------------
    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        from k2jax.presets import PRESETS  # presets import this module

        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any], **overrides) -> "ModelConfig":
        """Reads a hub config: a model directory, a config.json path, or its parsed dict.

        A K2.5-style wrapper config (`KimiK25ForConditionalGeneration`) gives its text model:
        `text_config`, with the wrapper's `quantization_config` when the text config has none;
        the vision tower is not part of the model k2jax runs (see `is_wrapper_config`)."""
        where = "config"
        if not isinstance(source, Mapping):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            try:
                with open(path) as f:
                    source = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"{path}: no such file") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls(**_fields_from_hf(text_model_config(source)), **overrides)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict (old `rope_scaling` key style, which every reader accepts)."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": self.model_type,
            "torch_dtype": self.dtype,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "moe_layer_freq": 1,
            "num_key_value_heads": self.num_attention_heads,
            "rope_interleave": True,
        }
        for f in dataclasses.fields(self):
            if f.name in ("dtype", "quantized_linears", "quant_group_size", "rope_scaling",
                          *RUNTIME_FIELDS):
                continue
            out[f.name] = getattr(self, f.name)
        out["rope_scaling"] = None
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            out["rope_scaling"] = {
                "type": "yarn", "factor": rs.factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings,
                "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow, "mscale": rs.mscale,
                "mscale_all_dim": rs.mscale_all_dim,
            }
            if not rs.truncate:  # the default is True; hub configs written so omit it
                out["rope_scaling"]["truncate"] = False
        return out


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """DeepSeek's YaRN attention magnitude correction, 0.1 * mscale * ln(scale) + 1."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ---- reading config.json ------------------------------------------------------------------

# Keys of config.json with no effect on the model k2jax runs (bookkeeping, generation defaults,
# auto-class maps, fields of other heads) or that are checked separately below.
_IGNORED_HF_KEYS = {
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "pretraining_tp", "num_nextn_predict_layers", "ep_size", "moe_layer_freq",
    "attention_dropout", "attention_bias", "hidden_act", "num_key_value_heads",
    "tie_word_embeddings", "scoring_func", "topk_method", "rope_scaling", "rope_parameters",
    "rope_theta", "rope_interleave", "quantization_config", "pad_token_id", "seq_aux",
    "aux_loss_alpha", "_name_or_path", "output_router_logits", "router_aux_loss_coef",
    "head_dim", "qk_head_dim", "mlp_layer_types", "layer_types", "num_mtp_layers",
    # Generic PretrainedConfig bookkeeping (transformers 4 and 5).
    "chunk_size_feed_forward", "id2label", "label2id", "is_encoder_decoder",
    "output_attentions", "output_hidden_states", "problem_type", "return_dict", "torchscript",
    "tie_encoder_decoder", "add_cross_attention", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "cross_attention_hidden_size",
    "is_decoder", "pruned_heads", "tf_legacy_loss", "use_bfloat16", "bad_words_ids",
    "num_beams", "num_beam_groups", "max_length", "min_length", "do_sample", "early_stopping",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "diversity_penalty", "output_router_logits",
}


def is_wrapper_config(hf: Mapping[str, Any]) -> bool:
    """Whether a config.json is a K2.5-style multimodal wrapper of the text model."""
    archs = hf.get("architectures") or []
    return (any(a in WRAPPER_ARCHITECTURES for a in archs)
            or hf.get("model_type") in WRAPPER_MODEL_TYPES or "text_config" in hf)


def text_model_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The text model's config.json dict: `hf` itself, or a wrapper's `text_config` (with the
    wrapper's `quantization_config` when the text config has none of its own)."""
    if not is_wrapper_config(hf):
        return dict(hf)
    text = hf.get("text_config")
    if not isinstance(text, Mapping):
        raise ConfigError(f"model_type {hf.get('model_type')!r} / architectures "
                          f"{hf.get('architectures')} wraps a text model, but text_config is "
                          f"{'missing' if text is None else type(text).__name__}")
    text = dict(text)
    if "quantization_config" not in text and hf.get("quantization_config"):
        text["quantization_config"] = hf["quantization_config"]
    return text


def _fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    archs = hf.get("architectures") or []
    if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ConfigError(f"architectures {archs} is not supported; k2jax runs "
                          f"{SUPPORTED_ARCHITECTURES}")
    checks = {
        "hidden_act": "silu", "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "attention_bias": False, "tie_word_embeddings": False, "moe_layer_freq": 1,
        "rope_interleave": True,
    }
    for key, want in checks.items():
        if key in hf and hf[key] != want:
            raise ConfigError(f"{key}={hf[key]!r} is not supported (k2jax implements {want!r})")
    derived = {"qk_head_dim": hf.get("qk_nope_head_dim", 0) + hf.get("qk_rope_head_dim", 0),
               "head_dim": hf.get("qk_rope_head_dim")}
    for key, want in derived.items():
        if hf.get(key) is not None and hf[key] != want:
            raise ConfigError(f"{key}={hf[key]} is inconsistent with the head dims (expected {want})")
    heads = hf.get("num_attention_heads")
    if hf.get("num_key_value_heads") not in (None, heads):
        raise ConfigError(f"num_key_value_heads={hf['num_key_value_heads']} must equal "
                          f"num_attention_heads={heads} for MLA")

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = {k: v for k, v in hf.items() if k in names and k not in (
        "rope_scaling", "dtype", "quantized_linears", "quant_group_size", "rope_theta",
        *RUNTIME_FIELDS)}
    unknown = sorted(set(hf) - names - _IGNORED_HF_KEYS)
    if unknown:
        raise ConfigError(f"unknown fields {unknown}; refusing to guess their meaning")
    if isinstance(fields.get("eos_token_id"), list):
        fields["eos_token_id"] = fields["eos_token_id"][0]
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    fields["dtype"] = dtype
    fields.update(_rope_from_hf(hf))
    fields.update(_quantization_from_hf(hf.get("quantization_config")))
    return fields


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if params is not None and scaling is not None and params != scaling:
        # transformers 5 writes both only when they agree; two different ones are ambiguous.
        raise ConfigError("rope_scaling and rope_parameters are both given and differ")
    spec = dict(params if params is not None else scaling or {})
    theta = spec.pop("rope_theta", None)
    if theta is not None and "rope_theta" in hf and hf["rope_theta"] != theta:
        raise ConfigError(f"rope_theta={hf['rope_theta']} disagrees with "
                          f"rope_parameters.rope_theta={theta}")
    theta = theta if theta is not None else hf.get("rope_theta", 10000.0)
    kind = spec.pop("rope_type", None) or spec.pop("type", None) or "default"
    spec.pop("type", None)
    if kind == "default":
        if spec.keys() - {"partial_rotary_factor"}:
            raise ConfigError(f"rope parameters {sorted(spec)} given for default rope")
        return {"rope_theta": float(theta), "rope_scaling": None}
    if kind != "yarn":
        raise ConfigError(f"rope type {kind!r} is not supported (only yarn or none)")
    allowed = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    extra = set(spec) - allowed - {"attention_factor"}
    if extra:
        raise ConfigError(f"unknown yarn rope parameters {sorted(extra)}")
    if spec.get("attention_factor") is not None:
        raise ConfigError("yarn attention_factor is not supported; DeepSeek configs give "
                          "mscale/mscale_all_dim instead")
    spec.pop("attention_factor", None)
    if "original_max_position_embeddings" not in spec:
        raise ConfigError("yarn rope scaling needs original_max_position_embeddings")
    if "factor" not in spec:
        raise ConfigError("yarn rope scaling needs factor")
    return {"rope_theta": float(theta), "rope_scaling": RopeScaling(**spec)}


def _quantization_from_hf(qc: dict[str, Any] | None) -> dict[str, Any]:
    """Maps a compressed-tensors `quantization_config` to the INT4 linear groups."""
    if not qc:
        return {}
    method = qc.get("quant_method")
    if method == "fp8":
        # FP8 block-quantized checkpoints (K2 Instruct, DeepSeek-V3) are dequantized to bf16
        # on conversion; the model itself is then unquantized.
        return {}
    if method != "compressed-tensors":
        raise ConfigError(f"quantization_config.quant_method {method!r} is not supported "
                          "(compressed-tensors pack-quantized INT4 or fp8)")
    if qc.get("format") != "pack-quantized":
        raise ConfigError(f"quantization_config.format {qc.get('format')!r} is not supported "
                          "(only pack-quantized)")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ConfigError(f"quantization_config has {len(groups)} config_groups; k2jax reads one")
    (group,) = groups.values()
    w = group.get("weights") or {}
    want = {"num_bits": 4, "symmetric": True, "strategy": "group", "type": "int"}
    for key, value in want.items():
        if w.get(key) != value:
            raise ConfigError(f"quantization weights.{key}={w.get(key)!r}; k2jax reads {value!r}")
    if group.get("input_activations"):
        raise ConfigError("activation quantization is not supported (weights-only INT4)")
    targets = group.get("targets") or []
    if targets != ["Linear"]:
        raise ConfigError(f"quantization targets {targets}; k2jax reads ['Linear']")
    ignore = qc.get("ignore") or []
    quantized = []
    for linear_group, modules in _HF_MODULE_EXAMPLES.items():
        # A wrapper's list may name modules with or without the `language_model.` prefix.
        hits = [not (_ignored(m, ignore) or _ignored(LANGUAGE_MODEL_PREFIX + m, ignore))
                for m in modules]
        if all(hits):
            quantized.append(linear_group)
        elif any(hits):
            raise ConfigError(f"quantization_config ignores only some linears of "
                              f"{linear_group}; k2jax quantizes whole groups")
    return {"quantized_linears": tuple(quantized), "quant_group_size": int(w["group_size"])}


def _ignored(module: str, ignore: list[str]) -> bool:
    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module):
                return True
        elif pattern == module:
            return True
    return False
