"""HF transformers' DeepseekV3ForCausalLM as the reference: build one with every parameter random
(router bias included) from a k2jax ModelConfig, and read its weights into the k2jax tree."""

from __future__ import annotations

import re

import numpy as np
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import k2jax
from convert import hf_layout


def hf_config(config: k2jax.ModelConfig) -> DeepseekV3Config:
    hf = DeepseekV3Config(**config.to_hf())
    hf._attn_implementation = "eager"
    return hf


def random_hf_model(config: k2jax.ModelConfig, seed: int = 0, std: float = 0.08,
                    bias_scale: float = 0.05) -> DeepseekV3ForCausalLM:
    """A float32 HF model whose every parameter and the router bias are random."""
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config(config)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("gate.weight"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(bias_scale * torch.randn_like(b))
    return model


def _t(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy()


def hub_state_dict(model) -> dict[str, torch.Tensor]:
    """`model.state_dict()` in hub naming: transformers' fused experts split per expert."""
    out = {}
    for name, t in model.state_dict().items():
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)", name)
        if m is None:
            out[name] = t
            continue
        for e in range(t.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{m.group(1)}.{e}.down_proj.weight"] = t[e]
            else:
                gate, up = t[e].chunk(2, dim=0)  # [2M, D]: gate rows first
                out[f"{m.group(1)}.{e}.gate_proj.weight"] = gate
                out[f"{m.group(1)}.{e}.up_proj.weight"] = up
    return out


def params_from_hf_model(config: k2jax.ModelConfig, model: DeepseekV3ForCausalLM):
    """The k2jax parameter tree (float32 numpy) holding `model`'s weights, read through the
    hub-name table `k2jax convert` uses."""
    tensors = hub_state_dict(model)
    return hf_layout.tree_from_hub(config.replace(dtype="float32", quantized_linears=()),
                                   lambda name: _t(tensors[name]))


def hf_logits(model: DeepseekV3ForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _t(model(torch.as_tensor(tokens, dtype=torch.long)).logits)


def hf_routing(model: DeepseekV3ForCausalLM, tokens: np.ndarray):
    """Per MoE layer: (router input [T, D], weights [T, K], indices [T, K]) as HF computes them."""
    records = []

    def hook(module, inputs, outputs):
        _, weights, indices = outputs
        records.append((_t(inputs[0].reshape(-1, inputs[0].shape[-1])), _t(weights),
                        indices.numpy()))

    handles = [l.mlp.gate.register_forward_hook(hook) for l in model.model.layers
               if hasattr(l.mlp, "gate")]
    try:
        hf_logits(model, tokens)
    finally:
        for h in handles:
            h.remove()
    return records
