"""k2jax: Kimi K2 / K2 Thinking (DeepSeek-V3 architecture) in JAX.

Dimension letters used in names and einsums:
  B batch, T query length, S key/cache length, D model (hidden), N heads, H nope head dim,
  R rope head dim, U value head dim, Q q-lora rank, C kv latent rank, F dense ffn, M expert ffn,
  E routed experts, K experts per token, G groups, V vocab, L layers.

Names are exported lazily so that `k2jax.text` (tokenizer, chat template) and `k2jax.config`
import without loading JAX.
"""

import importlib

_EXPORTS = {
    "forward_cached": "k2jax.api", "init_cache": "k2jax.api", "init_params": "k2jax.api",
    "logits": "k2jax.api", "param_axes": "k2jax.api", "param_shapes": "k2jax.api",
    "from_serving_layout": "k2jax.api", "to_serving_layout": "k2jax.api",
    "LatentCache": "k2jax.attention",
    "load": "k2jax.checkpoint", "save": "k2jax.checkpoint",
    "ConfigError": "k2jax.config", "ModelConfig": "k2jax.config", "RopeScaling": "k2jax.config",
    "QuantizedWeight": "k2jax.quant", "dequantize": "k2jax.quant", "quantize": "k2jax.quant",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'k2jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
