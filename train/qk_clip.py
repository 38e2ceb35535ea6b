"""QK-clip, the "Clip" of K2's MuonClip, for multi-head latent attention.

After each optimizer update, every head whose largest attention logit in the step's forward
(`S_max`, softmax scale included) exceeded the threshold `tau` has its query and key weights
rescaled by `gamma = tau / S_max` so that the same inputs would give at most `tau`. In MLA a
head's logit is `q_nope . k_nope + q_rope . k_rope`, and the rope key is shared by all heads, so
(as in the K2 report) the head's parts are scaled as

    q_nope columns of q_b_proj (or q_proj)   by sqrt(gamma)
    k_nope columns of kv_b_proj              by sqrt(gamma)
    q_rope columns of q_b_proj (or q_proj)   by gamma
    the shared k_rope (kv_a_proj_with_mqa)   untouched

which multiplies exactly that head's logits by gamma and leaves values and other heads alone.
Heads at or below the threshold are not touched. The statistic is the model's own
(`Transformer(max_logits=True)`, computed inside each attention layer as it runs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from k2jax.config import ModelConfig


def clip_factors(max_logits_ln: jax.Array, threshold: float) -> jax.Array:
    """`gamma [L, N]`: `threshold / S_max` where above the threshold, else 1."""
    return jnp.where(max_logits_ln > threshold, threshold / max_logits_ln, 1.0)


def _scale_heads(kernel, gamma_ln, n_heads, head_width, parts):
    """Scales per-head column blocks of a stacked kernel `[L, in, N * head_width]`.

    `parts` is a list of `(start, stop, power)`: columns `start:stop` of each head's block are
    multiplied by `gamma ** power`.
    """
    k = kernel.reshape(*kernel.shape[:-1], n_heads, head_width)
    factor = jnp.ones((*gamma_ln.shape, head_width), kernel.dtype)
    for start, stop, power in parts:
        factor = factor.at[..., start:stop].set((gamma_ln ** power)[..., None].astype(kernel.dtype))
    return (k * factor[:, None, :, :]).reshape(kernel.shape)


def apply_qk_clip(params, config: ModelConfig, max_logits: dict, threshold: float):
    """`params` with the query/key weights of every over-threshold head rescaled.

    Args:
      max_logits: `{stack: [L, N]}` per layer and head of each stack ("dense_layers",
        "moe_layers").
    """
    n, h, r, u = (config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                  config.v_head_dim)
    out = dict(params)
    for stack, logits_ln in max_logits.items():
        gamma = clip_factors(logits_ln, threshold)
        attn = dict(params[stack]["self_attn"])
        q_name = "q_b_proj" if config.q_lora_rank else "q_proj"
        attn[q_name] = {"kernel": _scale_heads(attn[q_name]["kernel"], gamma, n, h + r,
                                               [(0, h, 0.5), (h, h + r, 1.0)])}
        attn["kv_b_proj"] = {"kernel": _scale_heads(attn["kv_b_proj"]["kernel"], gamma, n, h + u,
                                                    [(0, h, 0.5)])}
        out[stack] = {**params[stack], "self_attn": attn}
    return out
