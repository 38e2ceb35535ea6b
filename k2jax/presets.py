"""Named configurations: the released models at full size and the small test/benchmark ones."""

from k2jax.config import ModelConfig, RopeScaling

_K2_COMMON = dict(
    vocab_size=163840,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    first_k_dense_replace=1,
    num_attention_heads=64,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=384,
    n_shared_experts=1,
    num_experts_per_tok=8,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.827,
    rms_norm_eps=1e-6,
    rope_theta=50000.0,
    max_position_embeddings=262144,
    bos_token_id=163584,
    eos_token_id=163585,
    model_type="kimi_k2",
)


def _yarn(factor, original=4096, beta_fast=32.0, beta_slow=1.0):
    return RopeScaling(factor=factor, original_max_position_embeddings=original,
                       beta_fast=beta_fast, beta_slow=beta_slow, mscale=1.0, mscale_all_dim=1.0)


# Moonshot's K2 configs set beta_fast = beta_slow = 1 (DeepSeek-V3 uses 32 / 1).
def _k2_yarn(factor):
    return _yarn(factor, beta_fast=1.0, beta_slow=1.0)


# K2.5 and later (K2.6, K2.7-Code) wrap a text model of K2's shape with DeepSeek's YaRN betas
# (32 / 1) and rms_norm_eps 1e-5; k2jax runs the text model.
_K25_TEXT = ModelConfig(**{**_K2_COMMON, "rms_norm_eps": 1e-5}, rope_scaling=_yarn(64.0),
                        quantized_linears=("routed_experts",))

PRESETS = {
    "kimi-k2.5": _K25_TEXT,
    "kimi-k2.6": _K25_TEXT,
    "kimi-k2.7-code": _K25_TEXT,
    "kimi-k2-thinking": ModelConfig(**_K2_COMMON, rope_scaling=_k2_yarn(64.0),
                                    quantized_linears=("routed_experts",)),
    "kimi-k2-instruct": ModelConfig(**{**_K2_COMMON, "max_position_embeddings": 131072},
                                    rope_scaling=_k2_yarn(32.0)),
    "deepseek-v3": ModelConfig(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
        topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-6,
        rope_theta=10000.0, rope_scaling=_yarn(40.0), max_position_embeddings=163840,
        bos_token_id=0, eos_token_id=1, model_type="deepseek_v3"),
    # Three layers (one dense), eight experts in two groups with group-limited routing, q-lora,
    # yarn past a 1024-token original context: every feature, in well under a second, with a
    # context (4096) that holds the chat template's tool and heavy-mode prompts.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, rope_theta=50000.0,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=1024,
                                 mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2),
    # ~1.3M parameters, K2's layout at tiny widths, with a 768-id vocabulary (512 BPE ranks and
    # K2's 256 control-token slots): the thinking agent of `examples/` trains it on two CPU cores
    # in minutes.
    "agent": ModelConfig(
        vocab_size=768, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, rope_theta=10000.0,
        max_position_embeddings=2048, bos_token_id=512, eos_token_id=513),
    # ~270M parameters (52M active per token), K2's shape ratios: the default demo and benchmarks.
    "small": ModelConfig(
        vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
        num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.827, rope_theta=50000.0,
        rope_scaling=_yarn(8.0, original=1024), max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=2),
}
