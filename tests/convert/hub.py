"""Hub-format checkpoints built in the tests: HF transformers models (every parameter random,
router bias included) written as Moonshot and DeepSeek ship them, with the safetensors and
compressed-tensors packages doing the writing and the INT4 packing. No downloads."""

from __future__ import annotations

import json
import math
import os
import re

import torch
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp
from safetensors import safe_open
from safetensors.torch import save_file


INT4_ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                             group_size=32)
# Kimi-K2-Thinking's quantization_config, as its config.json gives it.
K2_THINKING_QUANTIZATION = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                    "group_size": 32, "num_bits": 4, "observer": "minmax",
                    "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized", "ignore": [
        "lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
        "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}
FP8_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [128, 128]}
_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")


def fused_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `hub_state_dict`: per-expert hub tensors stacked into transformers' layout."""
    out, experts = {}, {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)_proj\.weight", name)
        if m is None:
            out[name] = t
        else:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
    for prefix, projs in experts.items():
        stack = {p: torch.stack([w[e] for e in sorted(w)]) for p, w in projs.items()}
        out[f"{prefix}.gate_up_proj"] = torch.cat([stack["gate"], stack["up"]], dim=1)
        out[f"{prefix}.down_proj"] = stack["down"]
    return out


def hf_model_with(model, tensors: dict[str, torch.Tensor]):
    """A float32 copy of the HF `model` holding the hub-named `tensors` instead of its weights."""
    copy = type(model)(model.config).float().eval()
    copy.load_state_dict(fused_state_dict(tensors), strict=True)
    return copy


def write_hub(directory, tensors: dict[str, torch.Tensor], model, shard_bytes: int = 150_000,
              quantization_config: dict | None = None, **config_changes) -> str:
    """Writes `tensors` as safetensors shards with an index and the model's config.json."""
    os.makedirs(directory)
    model.config.save_pretrained(directory)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(config_changes)
    if quantization_config:
        config["quantization_config"] = quantization_config
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.numel() * t.element_size() > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += t.numel() * t.element_size()
    shards.append(current)
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return directory


def read_hub(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a hub directory, checking each shard holds exactly what the index says."""
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    tensors = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(os.path.join(directory, file), framework="pt") as f:
            assert set(f.keys()) == {n for n, s in weight_map.items() if s == file}
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def int4_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Routed-expert weights compressed by compressed-tensors' pack-quantized compressor."""
    scheme = QuantizationScheme(targets=["Linear"], weights=INT4_ARGS)
    out = {}
    for name, t in tensors.items():
        if not _EXPERT.fullmatch(name):
            out[name] = t
            continue
        scale, zero_point = compute_dynamic_scales_and_zp(t, INT4_ARGS, module=None)
        packed = PackedQuantizationCompressor.compress(
            {"weight": t, "weight_scale": scale, "weight_zero_point": zero_point}, scheme)
        module = name[: -len(".weight")]
        out.update({f"{module}.{k}": v for k, v in packed.items()})
    return out


def fp8_linears(tensors: dict[str, torch.Tensor], block: int = 128) -> dict[str, torch.Tensor]:
    """DeepSeek-V3-style FP8: every 2-D linear weight (not embeddings, router or lm_head) as
    float8_e4m3fn with a float32 `weight_scale_inv` per `block` x `block` tile."""
    out = {}
    for name, t in tensors.items():
        if not name.endswith(("_proj.weight", "_proj_with_mqa.weight")):
            out[name] = t
            continue
        rows, cols = t.shape
        padded = torch.zeros(math.ceil(rows / block) * block, math.ceil(cols / block) * block)
        padded[:rows, :cols] = t.float()
        tiles = padded.reshape(padded.shape[0] // block, block, -1, block)
        scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        q = (tiles / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
        out[name] = q.to(torch.float8_e4m3fn)
        out[name + "_scale_inv"] = scale
    return out


def bf16(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor bf16 except the router (`mlp.gate.*`), float32 as in the hub checkpoints."""
    return {n: t if ".mlp.gate." in n else t.to(torch.bfloat16) for n, t in tensors.items()}
