"""The decoder: embedding, `first_k_dense_replace` dense layers, MoE layers, norm, lm_head.

Layers of each kind are stacked on a leading `layers` axis and run under `nn.scan`, so 61
layers compile as two loop bodies. The parameter tree (the checkpoint format):

    embed_tokens/embedding                         [V, D]
    dense_layers/  (stacked [L_dense, ...])        input_layernorm, self_attn, post_attention_layernorm,
                                                   mlp/{gate,up,down}_proj
    moe_layers/    (stacked [L_moe, ...])          input_layernorm, self_attn, post_attention_layernorm,
                                                   mlp/gate/{kernel, e_score_correction_bias},
                                                   mlp/experts/{gate,up,down}_proj/kernel [E, in, out],
                                                   mlp/shared_experts/{gate,up,down}_proj
    norm/scale                                     [D]
    lm_head/kernel                                 [D, V]

    self_attn: q_a_proj, q_a_layernorm, q_b_proj (or q_proj), kv_a_proj_with_mqa,
               kv_a_layernorm, kv_b_proj, o_proj; every linear is `{kernel: [in, out]}`.

The serving layout (`Transformer(serving_layout=True)`, `k2jax.api.to_serving_layout`) holds
the same weights as `dense_layers/{"0", "1", ...}`, one subtree per layer run one after the
other, and the float kernels of `lm_head` and `self_attn/kv_b_proj` transposed to `[out, in]`.
XLA:CPU copies a layer's weights out of a stacked array before multiplying (several times the
bytes a memory-bound decode step must read), multiplies a few rows by a wide matrix faster
with the matrix transposed, and the absorbed attention wants kv_b_proj head-major.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.attention import LayerCache, MLAttention
from k2jax.config import ModelConfig
from k2jax.layers import Embed, Linear, RMSNorm
from k2jax.moe import MLP, MoE

ACTIVATION_AXES = ("batch", "length", "embed")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
    """What a decoder layer reports beside its output; a stack's scan stacks each on axis 0.

    expert_load: int32 `[E]` token copies routed to each expert (`[0]` in a dense layer).
    max_logit: float32 `[N]` largest attention logit per head (with `max_logits`).
    balance_loss: float32 `[]` sequence-wise balance loss (MoE layers, with `balance_loss`).
    """

    expert_load: jax.Array
    max_logit: jax.Array | None = None
    balance_loss: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelStats:
    """The model's statistics over a forward, what training reads beside the logits.

    expert_load: int32 `[L_moe, E]` token copies per expert of each MoE layer.
    max_logits: `{stack: [L, N]}` largest attention logit per layer and head (when asked).
    balance_loss: the mean over MoE layers of the sequence-wise balance loss (when asked;
      0 without MoE layers).
    """

    expert_load: jax.Array
    max_logits: dict[str, jax.Array] | None = None
    balance_loss: jax.Array | None = None


class DecoderLayer(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `+ ffn(norm(.))` (dense MLP or MoE).

    `(x_btd, layer_cache, positions_bt, segment_ids_bt) -> (x_btd, (layer_cache, LayerStats))`.
    """

    config: ModelConfig
    moe: bool
    serving_layout: bool = False
    max_logits: bool = False
    balance_loss: bool = False

    @nn.compact
    def __call__(self, x_btd, layer_cache, positions_bt, segment_ids_bt):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x_btd = nn.with_logical_constraint(x_btd, ACTIVATION_AXES)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, dtype, dtype, name=name)  # noqa: E731
        attn_out, layer_cache, max_logit_n = MLAttention(
            cfg, self.serving_layout, self.max_logits, name="self_attn")(
            norm("input_layernorm")(x_btd), positions_bt, segment_ids_bt, layer_cache)
        x_btd = x_btd + attn_out
        h = norm("post_attention_layernorm")(x_btd)
        balance = None
        if self.moe:
            valid_bt = None if segment_ids_bt is None else segment_ids_bt > 0
            ffn_out, expert_load_e, balance = MoE(cfg, self.balance_loss, name="mlp")(h, valid_bt)
        else:
            ffn_out = MLP(cfg, cfg.intermediate_size, "dense_mlp", name="mlp")(h)
            expert_load_e = jnp.zeros((0,), jnp.int32)
        return x_btd + ffn_out, (layer_cache, LayerStats(expert_load_e, max_logit_n, balance))


def _layer_class(remat_policy: str | None):
    if remat_policy is None:
        return DecoderLayer
    return nn.remat(DecoderLayer, prevent_cse=False,
                    policy=getattr(jax.checkpoint_policies, remat_policy))


def layer_stack(config: ModelConfig, num_layers: int, moe: bool, remat_policy: str | None,
                name: str, **statistics):
    """`num_layers` identical decoder layers, parameters stacked on axis 0, run by `scan`.

    Called as `(x_btd, stack_cache, positions_bt, segment_ids_bt) -> (x_btd, (cache, stats))`,
    `stats` the layers' `LayerStats` stacked; `statistics`: `DecoderLayer`'s flags.
    The stack's cache rides in the scan carry; each layer sees it through a `LayerCache` and
    updates its own slots in place.
    """
    layer = _layer_class(remat_policy)

    def body(module, carry, index, positions_bt, segment_ids_bt):
        x_btd, cache = carry
        view = None if cache is None else LayerCache(cache, index)
        x_btd, (view, stats) = module(x_btd, view, positions_bt, segment_ids_bt)
        return (x_btd, None if view is None else view.stack), stats

    scanned = nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    module = layer(config, moe, name=name, **statistics)

    def run(x_btd, stack_cache, positions_bt, segment_ids_bt):
        (x_btd, stack_cache), stats = scanned(module, (x_btd, stack_cache),
                                              jnp.arange(num_layers), positions_bt,
                                              segment_ids_bt)
        return x_btd, (stack_cache, stats)

    return run


class LayerList(nn.Module):
    """`num_layers` decoder layers with parameters of their own (`{"0": ..., "1": ...}`), run
    one after the other; called like `layer_stack`'s function (the serving layout)."""

    config: ModelConfig
    num_layers: int
    moe: bool
    remat_policy: str | None = None

    @nn.compact
    def __call__(self, x_btd, stack_cache, positions_bt, segment_ids_bt):
        layer = _layer_class(self.remat_policy)
        per_layer = []
        for index in range(self.num_layers):
            view = None if stack_cache is None else LayerCache(stack_cache, index)
            x_btd, (view, stats) = layer(self.config, self.moe, serving_layout=True,
                                         name=str(index))(
                x_btd, view, positions_bt, segment_ids_bt)
            stack_cache = None if view is None else view.stack
            per_layer.append(stats)
        return x_btd, (stack_cache, jax.tree.map(lambda *a: jnp.stack(a), *per_layer))


class Transformer(nn.Module):
    """`tokens [B, T] -> (logits [B, T, V] float32, caches, ModelStats)`.

    With `logits_index_b [B]`, only the logits at that position of each row, `[B, 1, V]`.
    `serving_layout` reads the parameters in the serving layout (see the module docstring).
    `max_logits` / `balance_loss` add those statistics (training: QK-clip and the balance
    loss), computed inside the layers as they run.
    """

    config: ModelConfig
    remat_policy: str | None = None
    serving_layout: bool = False
    max_logits: bool = False
    balance_loss: bool = False

    @nn.compact
    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, cache=None,
                 logits_index_b=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if self.serving_layout and (self.max_logits or self.balance_loss):
            raise ValueError("max_logits and balance_loss are training statistics; the serving "
                             "layout does not compute them")
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        x_btd = Embed(cfg.vocab_size, cfg.hidden_size, dtype, dtype, cfg.initializer_range,
                      name="embed_tokens")(tokens_bt)
        cache = cache or {}
        new_cache, stats = {}, {}
        for stack, count, is_moe in cfg.layer_stacks:
            if self.serving_layout:
                layers = LayerList(cfg, count, is_moe, self.remat_policy, name=stack)
            else:
                layers = layer_stack(cfg, count, is_moe, self.remat_policy, name=stack,
                                     max_logits=self.max_logits, balance_loss=self.balance_loss)
            x_btd, (new_cache[stack], stats[stack]) = layers(x_btd, cache.get(stack),
                                                             positions_bt, segment_ids_bt)
        if logits_index_b is not None:
            # Prefill needs only the next-token logits: skip the lm_head on the rest.
            x_btd = jnp.take_along_axis(x_btd, logits_index_b[:, None, None], axis=1)
        x_btd = RMSNorm(cfg.rms_norm_eps, dtype, dtype, name="norm")(x_btd)
        head = Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), dtype=dtype,
                      param_dtype=dtype, quantized=cfg.is_quantized("lm_head"),
                      group_size=cfg.quant_group_size, init_std=cfg.initializer_range,
                      kernel_out_in=self.serving_layout,
                      name="lm_head")
        logits = head(x_btd).astype(jnp.float32)
        return logits, (new_cache if cache else None), self._model_stats(stats)

    def _model_stats(self, stats: dict[str, LayerStats]) -> ModelStats:
        moe = next((stats[name] for name, _, is_moe in self.config.layer_stacks if is_moe), None)
        expert_load = (jnp.zeros((0, self.config.n_routed_experts), jnp.int32) if moe is None
                       else moe.expert_load)
        max_logits = balance = None
        if self.max_logits:
            max_logits = {stack: s.max_logit for stack, s in stats.items()}
        if self.balance_loss:
            balance = (jnp.zeros((), jnp.float32) if moe is None
                       else jnp.mean(moe.balance_loss))
        return ModelStats(expert_load, max_logits, balance)
