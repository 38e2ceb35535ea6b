"""HF transformers' DeepseekV3ForCausalLM as the reference: build one with every parameter random
(router bias included) from a k2jax ModelConfig, and read its weights into the k2jax tree."""

from __future__ import annotations

import numpy as np
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import k2jax


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


def params_from_hf_model(config: k2jax.ModelConfig, model: DeepseekV3ForCausalLM):
    """The k2jax parameter tree (float32 numpy) holding `model`'s weights."""
    def linear(module):
        return {"kernel": _t(module.weight).T}

    def norm(module):
        return {"scale": _t(module.weight)}

    def layer(hf_layer, moe):
        a = hf_layer.self_attn
        attn = {"kv_a_proj_with_mqa": linear(a.kv_a_proj_with_mqa),
                "kv_a_layernorm": norm(a.kv_a_layernorm), "kv_b_proj": linear(a.kv_b_proj),
                "o_proj": linear(a.o_proj)}
        if config.q_lora_rank:
            attn.update(q_a_proj=linear(a.q_a_proj), q_a_layernorm=norm(a.q_a_layernorm),
                        q_b_proj=linear(a.q_b_proj))
        else:
            attn["q_proj"] = linear(a.q_proj)
        m = hf_layer.mlp
        if moe:
            gate_up = _t(m.experts.gate_up_proj)  # [E, 2M, D]
            inter = config.moe_intermediate_size
            mlp = {
                "gate": {"kernel": _t(m.gate.weight).T,
                         "e_score_correction_bias": _t(m.gate.e_score_correction_bias)},
                "experts": {"gate_proj": {"kernel": gate_up[:, :inter].transpose(0, 2, 1)},
                            "up_proj": {"kernel": gate_up[:, inter:].transpose(0, 2, 1)},
                            "down_proj": {"kernel": _t(m.experts.down_proj).transpose(0, 2, 1)}},
                "shared_experts": {k: linear(getattr(m.shared_experts, k))
                                   for k in ("gate_proj", "up_proj", "down_proj")},
            }
        else:
            mlp = {k: linear(getattr(m, k)) for k in ("gate_proj", "up_proj", "down_proj")}
        return {"input_layernorm": norm(hf_layer.input_layernorm), "self_attn": attn,
                "post_attention_layernorm": norm(hf_layer.post_attention_layernorm), "mlp": mlp}

    def stack(layers):
        return jax_tree_stack(layers)

    hf_layers = model.model.layers
    k = config.first_k_dense_replace
    params = {"embed_tokens": {"embedding": _t(model.model.embed_tokens.weight)},
              "norm": norm(model.model.norm), "lm_head": linear(model.lm_head)}
    if k:
        params["dense_layers"] = stack([layer(l, False) for l in hf_layers[:k]])
    if config.num_moe_layers:
        params["moe_layers"] = stack([layer(l, True) for l in hf_layers[k:]])
    return params


def jax_tree_stack(trees):
    import jax

    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


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
