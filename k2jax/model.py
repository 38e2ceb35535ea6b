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

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.attention import LayerCache, MLAttention
from k2jax.config import ModelConfig
from k2jax.layers import Embed, Linear, RMSNorm
from k2jax.moe import MLP, MoE

ACTIVATION_AXES = ("batch", "length", "embed")


class DecoderLayer(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `+ ffn(norm(.))` (dense MLP or MoE)."""

    config: ModelConfig
    moe: bool
    serving_layout: bool = False

    @nn.compact
    def __call__(self, x_btd, layer_cache, positions_bt, segment_ids_bt):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x_btd = nn.with_logical_constraint(x_btd, ACTIVATION_AXES)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, dtype, dtype, name=name)  # noqa: E731
        attn_out, layer_cache = MLAttention(cfg, self.serving_layout, name="self_attn")(
            norm("input_layernorm")(x_btd), positions_bt, segment_ids_bt, layer_cache)
        x_btd = x_btd + attn_out
        h = norm("post_attention_layernorm")(x_btd)
        if self.moe:
            ffn_out, expert_load_e = MoE(cfg, name="mlp")(h)
        else:
            ffn_out = MLP(cfg, cfg.intermediate_size, "dense_mlp", name="mlp")(h)
            expert_load_e = jnp.zeros((0,), jnp.int32)
        return x_btd + ffn_out, (layer_cache, expert_load_e)


def _layer_class(remat_policy: str | None):
    if remat_policy is None:
        return DecoderLayer
    return nn.remat(DecoderLayer, prevent_cse=False,
                    policy=getattr(jax.checkpoint_policies, remat_policy))


def layer_stack(config: ModelConfig, num_layers: int, moe: bool, remat_policy: str | None,
                name: str):
    """`num_layers` identical decoder layers, parameters stacked on axis 0, run by `scan`.

    Called as `(x_btd, stack_cache, positions_bt, segment_ids_bt) -> (x_btd, (cache, load))`.
    The stack's cache rides in the scan carry; each layer sees it through a `LayerCache` and
    updates its own slots in place.
    """
    layer = _layer_class(remat_policy)

    def body(module, carry, index, positions_bt, segment_ids_bt):
        x_btd, cache = carry
        view = None if cache is None else LayerCache(cache, index)
        x_btd, (view, load_e) = module(x_btd, view, positions_bt, segment_ids_bt)
        return (x_btd, None if view is None else view.stack), load_e

    scanned = nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    module = layer(config, moe, name=name)

    def run(x_btd, stack_cache, positions_bt, segment_ids_bt):
        (x_btd, stack_cache), load_le = scanned(module, (x_btd, stack_cache),
                                                jnp.arange(num_layers), positions_bt,
                                                segment_ids_bt)
        return x_btd, (stack_cache, load_le)

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
        loads = []
        for index in range(self.num_layers):
            view = None if stack_cache is None else LayerCache(stack_cache, index)
            x_btd, (view, load_e) = layer(self.config, self.moe, serving_layout=True,
                                          name=str(index))(
                x_btd, view, positions_bt, segment_ids_bt)
            stack_cache = None if view is None else view.stack
            loads.append(load_e)
        return x_btd, (stack_cache, jnp.stack(loads))


class Transformer(nn.Module):
    """`tokens [B, T] -> (logits [B, T, V] float32, caches, expert_load [L_moe, E])`.

    With `logits_index_b [B]`, only the logits at that position of each row, `[B, 1, V]`.
    `serving_layout` reads the parameters in the serving layout (see the module docstring).
    """

    config: ModelConfig
    remat_policy: str | None = None
    serving_layout: bool = False

    @nn.compact
    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, cache=None,
                 logits_index_b=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        x_btd = Embed(cfg.vocab_size, cfg.hidden_size, dtype, dtype, cfg.initializer_range,
                      name="embed_tokens")(tokens_bt)
        cache = cache or {}
        new_cache, expert_load = {}, None
        for stack, count, is_moe in (("dense_layers", cfg.num_dense_layers, False),
                                     ("moe_layers", cfg.num_moe_layers, True)):
            if count == 0:
                continue
            if self.serving_layout:
                layers = LayerList(cfg, count, is_moe, self.remat_policy, name=stack)
            else:
                layers = layer_stack(cfg, count, is_moe, self.remat_policy, name=stack)
            x_btd, (stack_cache, load_le) = layers(x_btd, cache.get(stack), positions_bt,
                                                   segment_ids_bt)
            new_cache[stack] = stack_cache
            if is_moe:
                expert_load = load_le
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
        return logits, (new_cache if cache else None), expert_load
