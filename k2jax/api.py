"""The functional entry points: parameters, logits and the cached (absorbed-MLA) forward."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax import quant
from k2jax.attention import LatentCache
from k2jax.config import STACK_NAMES, ModelConfig
from k2jax.model import Transformer


def _boxed_init(config: ModelConfig, key: jax.Array, serving_layout: bool = False):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Transformer(config, serving_layout=serving_layout).init(key, tokens)["params"]


@functools.partial(jax.jit, static_argnums=0)
def _init(config: ModelConfig, key: jax.Array):
    return nn.unbox(_boxed_init(config, key))


def init_params(config: ModelConfig, key: jax.Array):
    """A random parameter tree (see `k2jax.model` for its layout)."""
    return _init(config, key)


def param_shapes(config: ModelConfig, serving_layout: bool = False):
    """The abstract parameter tree: `jax.ShapeDtypeStruct` leaves, no memory allocated.

    `serving_layout`: the tree of `to_serving_layout` instead of the checkpoint's."""
    if serving_layout:
        return jax.eval_shape(lambda: nn.unbox(_boxed_init(config, jax.random.key(0), True)))
    return jax.eval_shape(functools.partial(_init, config), jax.random.key(0))


def param_axes(config: ModelConfig, serving_layout: bool = False):
    """Logical axis names of every parameter leaf, as a tree of tuples matching the params
    (those of `to_serving_layout` with `serving_layout`).

    A `QuantizedWeight` gets the same names for its `values` and `scale`.
    """
    boxed = jax.eval_shape(functools.partial(_boxed_init, config, serving_layout=serving_layout),
                           jax.random.key(0))

    def names(box):
        value = box.value
        if isinstance(value, quant.QuantizedWeight):
            return quant.QuantizedWeight(box.names, box.names)
        return box.names

    return jax.tree.map(names, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _transpose_float(linear):
    kernel = linear["kernel"]
    if isinstance(kernel, quant.QuantizedWeight):
        return linear
    return {**linear, "kernel": kernel.T}


def _layout_linears(params):
    """`params` (one subtree per layer) with the float kernels of lm_head and of each layer's
    kv_b_proj transposed, `[in, out]` <-> `[out, in]`: its own inverse."""
    out = {**params, "lm_head": _transpose_float(params["lm_head"])}
    for stack in STACK_NAMES:
        if stack in out:
            out[stack] = {key: {**layer, "self_attn": {
                **layer["self_attn"],
                "kv_b_proj": _transpose_float(layer["self_attn"]["kv_b_proj"])}}
                for key, layer in out[stack].items()}
    return out


def to_serving_layout(params):
    """The same weights in the serving layout (`k2jax.model`): each stacked layer leaf split
    into one per layer, the float kernels of lm_head and kv_b_proj transposed to `[out, in]`."""
    out = dict(params)
    for stack in STACK_NAMES:
        if stack in out:
            count = jax.tree.leaves(out[stack])[0].shape[0]
            out[stack] = {str(i): jax.tree.map(lambda a, i=i: a[i], out[stack])
                          for i in range(count)}
    return _layout_linears(out)


def from_serving_layout(params):
    """Inverse of `to_serving_layout`: the stacked (checkpoint) layout."""
    out = _layout_linears(params)
    for stack in STACK_NAMES:
        if stack in out:
            layers = [out[stack][str(i)] for i in range(len(out[stack]))]
            out[stack] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return out


def logits(config: ModelConfig, params, tokens_bt: jax.Array, positions_bt=None,
           segment_ids_bt=None, *, serving_layout: bool = False) -> jax.Array:
    """float32 logits `[B, T, V]` of int32 `tokens [B, T]` (positions `0..T-1` by default).

    `serving_layout`: `params` are in the serving layout (`to_serving_layout`).
    """
    out, _, _ = Transformer(config, serving_layout=serving_layout).apply(
        {"params": params}, tokens_bt, positions_bt, segment_ids_bt)
    return out


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16):
    """An empty latent cache: per stack, `ckv [L, B, S, C]` and `kpe [L, B, S, R]`."""
    cache = {}
    for stack, count, _ in config.layer_stacks:
        cache[stack] = LatentCache(
            jnp.zeros((count, batch, max_len, config.kv_lora_rank), dtype),
            jnp.zeros((count, batch, max_len, config.qk_rope_head_dim), dtype))
    return cache


def forward_cached(config: ModelConfig, params, tokens_bt: jax.Array, positions_bt: jax.Array,
                   cache, logits_index_b: jax.Array | None = None, *,
                   serving_layout: bool = False):
    """Absorbed-MLA forward that writes `tokens` into `cache` at `positions` and attends to
    every cached slot at or before each query's position.

    Serves prefill (T = prompt length) and decode (T = 1) alike. `cache` is a `LatentCache` per
    stack or any layout with its `write`/`read` methods.
    Returns float32 logits `[B, T, V]` (`[B, 1, V]` at `logits_index_b [B]` when given) and the
    updated cache. `serving_layout`: `params` are in the serving layout.
    """
    out, new_cache, _ = Transformer(config, serving_layout=serving_layout).apply(
        {"params": params}, tokens_bt, positions_bt, None, cache, logits_index_b)
    return out, new_cache
