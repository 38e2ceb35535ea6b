"""k2jax: Kimi K2 / K2 Thinking (DeepSeek-V3 architecture) in JAX.

Dimension letters used in names and einsums:
  B batch, T query length, S key/cache length, D model (hidden), N heads, H nope head dim,
  R rope head dim, U value head dim, Q q-lora rank, C kv latent rank, F dense ffn, M expert ffn,
  E routed experts, K experts per token, G groups, V vocab, L layers.
"""

from k2jax.api import (forward_cached, init_cache, init_params, logits, param_axes,
                       param_shapes)
from k2jax.attention import LatentCache
from k2jax.config import ConfigError, ModelConfig, RopeScaling
from k2jax.quant import QuantizedWeight, dequantize, quantize

__all__ = [
    "ConfigError", "LatentCache", "ModelConfig", "QuantizedWeight", "RopeScaling", "dequantize",
    "forward_cached", "init_cache", "init_params", "logits", "param_axes", "param_shapes",
    "quantize",
]
