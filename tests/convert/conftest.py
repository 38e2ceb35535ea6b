"""Hub checkpoints shared by the conversion tests, built once per session from random HF models.

- `k2_hub`: Kimi K2 style (`kimi_k2`, tiny), bf16 with the float32 router, hub naming.
- `k2_int4_hub`: the same weights with the routed experts compressed-tensors INT4, under
  K2 Thinking's `quantization_config`.
- `dsv3_hub`: DeepSeek-V3 style (`deepseek_v3`, group-limited routing, no q-lora, two dense
  layers), float32, written by transformers' own `save_pretrained`.
- `fp8_hub`: the K2 weights FP8 block-quantized (32x32 blocks, so edges are partial).
"""

import dataclasses

import pytest
import torch

import k2jax
from tests.convert import hub
from tests.hf_reference import hub_state_dict, random_hf_model

K2 = k2jax.ModelConfig.preset("tiny").replace(dtype="float32")
DSV3 = k2jax.ModelConfig.preset("tiny").replace(
    dtype="float32", model_type="deepseek_v3", n_group=4, topk_group=2, n_routed_experts=16,
    num_experts_per_tok=4, num_hidden_layers=4, first_k_dense_replace=2, q_lora_rank=None,
    rope_theta=10000.0)


@dataclasses.dataclass
class Hub:
    path: str
    model: torch.nn.Module  # the HF model the tensors came from
    tensors: dict  # hub name -> torch tensor, exactly as written


@pytest.fixture(scope="session")
def k2_model():
    return random_hf_model(K2, seed=0)


@pytest.fixture(scope="session")
def k2_hub(tmp_path_factory, k2_model):
    tensors = hub.bf16(hub_state_dict(k2_model))
    path = hub.write_hub(tmp_path_factory.mktemp("hub") / "k2", tensors, k2_model,
                         dtype="bfloat16")
    return Hub(str(path), k2_model, tensors)


@pytest.fixture(scope="session")
def k2_int4_hub(tmp_path_factory, k2_model):
    tensors = hub.int4_experts(hub.bf16(hub_state_dict(k2_model)))
    path = hub.write_hub(tmp_path_factory.mktemp("hub") / "k2_int4", tensors, k2_model,
                         quantization_config=hub.K2_THINKING_QUANTIZATION, dtype="bfloat16")
    return Hub(str(path), k2_model, tensors)


@pytest.fixture(scope="session")
def fp8_hub(tmp_path_factory, k2_model):
    tensors = hub.fp8_linears(hub.bf16(hub_state_dict(k2_model)), block=32)
    qc = dict(hub.FP8_QUANTIZATION, weight_block_size=[32, 32])
    path = hub.write_hub(tmp_path_factory.mktemp("hub") / "fp8", tensors, k2_model,
                         quantization_config=qc, dtype="bfloat16")
    return Hub(str(path), k2_model, tensors)


@pytest.fixture(scope="session")
def dsv3_hub(tmp_path_factory):
    model = random_hf_model(DSV3, seed=1)
    path = tmp_path_factory.mktemp("hub") / "dsv3"
    model.save_pretrained(path, max_shard_size="200KB")
    return Hub(str(path), model, hub_state_dict(model))
