"""The training forward: logits and expert load, plus router and attention statistics on request.

Without statistics this is `Transformer(config, remat_policy=...).apply`. The sequence-wise
balance loss needs each MoE layer's router input and selection, and QK-clip needs each layer's
largest attention logit per head; neither is a model output, and Flax's intermediate capture does
not cross the model's `nn.scan`. So for those, `forward` runs the model's own `DecoderLayer`s under
`jax.lax.scan`, capturing the outputs of named submodules, and reduces them inside the scanned
body (nothing per-token is stacked). The composition (embedding, dense stack, MoE stack, final
norm, lm_head) mirrors `Transformer.__call__`; a test holds the two equal bit for bit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from k2jax import rotary
from k2jax.config import ModelConfig
from k2jax.layers import Embed, Linear, RMSNorm
from k2jax.model import DecoderLayer, Transformer
from pallas_kernels.attention import blockwise

_CAPTURED = ("q_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "post_attention_layernorm",
             "gate")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardOut:
    """logits float32 `[B, T, V]`; expert_load int32 `[L_moe, E]` (token copies per expert);
    balance_loss: mean over MoE layers of the sequence-wise balance loss (when asked);
    max_logits: `{stack: [L, N]}` largest attention logit per layer and head (when asked)."""

    logits: jax.Array
    expert_load: jax.Array
    balance_loss: jax.Array | None = None
    max_logits: dict[str, jax.Array] | None = None


def forward(config: ModelConfig, params, batch, *, remat_policy: str | None = None,
            balance_loss: bool = False, max_logits: bool = False) -> ForwardOut:
    """Args:
      params: the compute parameter tree (`train.qat.compute_params`).
      batch: `tokens`, `positions`, `segment_ids`, each int32 `[B, T]`.
    """
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    empty_load = jnp.zeros((0, config.n_routed_experts), jnp.int32)
    if not (balance_loss or max_logits):
        logits, _, load = Transformer(config, remat_policy=remat_policy).apply(
            {"params": params}, *args)
        return ForwardOut(logits, empty_load if load is None else load)

    tokens_bt, positions_bt, segment_ids_bt = args
    dtype = jnp.dtype(config.dtype)
    x = Embed(config.vocab_size, config.hidden_size, dtype, dtype).apply(
        {"params": params["embed_tokens"]}, tokens_bt)
    load, balance, logit_max = empty_load, [], {}
    for stack, count, moe in (("dense_layers", config.num_dense_layers, False),
                              ("moe_layers", config.num_moe_layers, True)):
        if count == 0:
            continue

        def body(x_btd, layer_params, moe=moe):
            (x_btd, (_, load_e)), captured = DecoderLayer(config, moe).apply(
                {"params": layer_params}, x_btd, None, positions_bt, segment_ids_bt,
                capture_intermediates=_captured, mutable=["intermediates"])
            got = _outputs(captured["intermediates"])
            stats = {}
            if max_logits:
                stats["max_logits"] = max_attention_logits(config, got, positions_bt,
                                                           segment_ids_bt)
            if moe and balance_loss:
                stats["balance"] = sequence_balance_loss(
                    config, got["post_attention_layernorm"], layer_params["mlp"]["gate"]["kernel"],
                    got["gate"][1], segment_ids_bt > 0)
            return x_btd, (load_e, stats)

        if remat_policy is not None:
            body = jax.checkpoint(body, prevent_cse=False,
                                  policy=getattr(jax.checkpoint_policies, remat_policy))
        x, (load_le, stats) = jax.lax.scan(body, x, params[stack])
        if moe:
            load = load_le
            if balance_loss:
                balance.append(stats["balance"])
        if max_logits:
            logit_max[stack] = stats["max_logits"]
    x = RMSNorm(config.rms_norm_eps, dtype, dtype).apply({"params": params["norm"]}, x)
    head = Linear(config.hidden_size, config.vocab_size, ("embed", "vocab"), dtype=dtype,
                  param_dtype=dtype)
    logits = head.apply({"params": params["lm_head"]}, x).astype(jnp.float32)
    return ForwardOut(logits, load,
                      jnp.mean(jnp.concatenate(balance)) if balance else None,
                      logit_max if max_logits else None)


def _captured(module, method: str) -> bool:
    return method == "__call__" and module.name in _CAPTURED


def _outputs(captured) -> dict:
    """`{module name: output}` from Flax's nested intermediates of one decoder layer."""
    found = {}

    def walk(tree):
        for name, sub in tree.items():
            if isinstance(sub, dict) and "__call__" in sub:
                found[name] = sub["__call__"][0]
            if isinstance(sub, dict):
                walk({k: v for k, v in sub.items() if k != "__call__"})

    walk(captured)
    return found


def max_attention_logits(config: ModelConfig, got: dict, positions_bt, segment_ids_bt):
    """Largest pre-softmax attention logit (softmax scale included) of each head, `[N]`.

    Recomputed from the layer's projections: q from q_b_proj (or q_proj), the roped shared key
    from kv_a_proj_with_mqa, the per-head nope key from kv_b_proj; masked as the model masks,
    block by block as the attention runs (memory linear in T).
    """
    n, h, r = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    q = got["q_b_proj"] if config.q_lora_rank else got["q_proj"]
    b, t = q.shape[:2]
    cos, sin = rotary.cos_sin(config, positions_bt)
    q_btnk = q.reshape(b, t, n, h + r)
    q_nope, q_pe = q_btnk[..., :h], rotary.apply_rotary(q_btnk[..., h:], cos, sin)
    k_pe_bsr = rotary.apply_rotary(got["kv_a_proj_with_mqa"][:, :, None, config.kv_lora_rank:],
                                   cos, sin)[:, :, 0, :]
    k_nope = got["kv_b_proj"].reshape(b, t, n, -1)[..., :h]
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe_bsr[:, :, None], (b, t, n, r))], axis=-1)
    max_btn = blockwise.max_scores(q, k, positions_bt, positions_bt, segment_ids_bt,
                                   segment_ids_bt, scale=config.softmax_scale)
    return jax.lax.stop_gradient(jnp.max(max_btn, axis=(0, 1)))


def sequence_balance_loss(config: ModelConfig, h_btd, router_kernel_de, indices_tk, valid_bt):
    """DeepSeek-V3's sequence-wise balance loss of one MoE layer, averaged over rows.

    Per row, over its valid tokens: `f_e = E / (K T) * #{t : e in topk(t)}` (not differentiated)
    and `P_e = mean_t s_te / sum_e' s_te'` of the unbiased sigmoid scores; loss `sum_e f_e P_e`
    (1 when balanced).
    """
    e, k = config.n_routed_experts, config.num_experts_per_tok
    b, t = h_btd.shape[:2]
    scores = jax.nn.sigmoid(jnp.einsum("btd,de->bte", h_btd.astype(jnp.float32),
                                       router_kernel_de.astype(jnp.float32)))
    affinity = scores / jnp.sum(scores, axis=-1, keepdims=True)
    valid = valid_bt.astype(jnp.float32)[..., None]
    count_b = jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1.0)[:, None]
    chosen = jax.nn.one_hot(indices_tk.reshape(b, t, k), e, dtype=jnp.float32).sum(axis=2)
    f_be = jax.lax.stop_gradient(e / k * jnp.sum(chosen * valid, axis=1) / count_b)
    p_be = jnp.sum(affinity * valid, axis=1) / count_b
    return jnp.mean(jnp.sum(f_be * p_be, axis=-1))[None]
