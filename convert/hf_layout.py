"""The one table between hub tensor names and k2jax tree paths, and the transforms between them.

    hub (DeepSeek-V3 / Kimi K2; linears [out, in])  k2jax tree (`k2jax.model`; kernels [in, out])
    model.embed_tokens.weight          [V, D]       embed_tokens/embedding        [V, D]
    model.norm.weight                  [D]          norm/scale                    [D]
    lm_head                            [V, D]       lm_head/kernel                [D, V]
    model.layers.{i}.<rule>                         dense_layers/<path>[i]        (i < k)
                                                    moe_layers/<path>[i - k]      (i >= k)
    model.layers.{i}.mlp.experts.{e}.<proj>         moe_layers/mlp/experts/<proj>/kernel[i-k, e]

with k = `first_k_dense_replace`.

Tensors of layers past `num_hidden_layers` (DeepSeek-V3's multi-token-prediction layer 61,
`num_nextn_predict_layers`) are skipped: k2jax does not run multi-token prediction.

A linear (named by its module, without `.weight`) is stored in the hub in one of three ways:

    plain  .weight [out, in] bf16/f16/f32                     kernel = weight.T
    fp8    .weight float8_e4m3fn [out, in]                    kernel = (weight * scale_inv
           .weight_scale_inv f32 [ceil(out/bo), ceil(in/bi)]           per bo x bi block).T
    int4   .weight_packed int32 [out, in/8]                   QuantizedWeight(values int4 [in, out],
           .weight_scale [out, in/g], .weight_shape [2]                       scale [in/g, out])

INT4 is read where the config's `quantization_config` quantizes the linear's group (see
`ModelConfig.quantized_linears`), FP8 where `quant_method` is "fp8" and a `.weight_scale_inv`
accompanies the weight.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np

from convert import transforms
from k2jax import compressed_tensors
from k2jax import quant
from k2jax.api import param_shapes
from k2jax.config import ModelConfig

TENSOR, TRANSPOSE, LINEAR = "tensor", "transpose", "linear"
FLOATS = ("F32", "BF16", "F16")

# (hub name under its prefix, tree path under its stack or the root, kind). `{e}`: expert.
TOP_RULES = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", TENSOR),
    ("model.norm.weight", "norm/scale", TENSOR),
    ("lm_head", "lm_head/kernel", LINEAR),
)
LAYER_RULES = (
    ("input_layernorm.weight", "input_layernorm/scale", TENSOR),
    ("post_attention_layernorm.weight", "post_attention_layernorm/scale", TENSOR),
    ("self_attn.q_proj", "self_attn/q_proj/kernel", LINEAR),
    ("self_attn.q_a_proj", "self_attn/q_a_proj/kernel", LINEAR),
    ("self_attn.q_a_layernorm.weight", "self_attn/q_a_layernorm/scale", TENSOR),
    ("self_attn.q_b_proj", "self_attn/q_b_proj/kernel", LINEAR),
    ("self_attn.kv_a_proj_with_mqa", "self_attn/kv_a_proj_with_mqa/kernel", LINEAR),
    ("self_attn.kv_a_layernorm.weight", "self_attn/kv_a_layernorm/scale", TENSOR),
    ("self_attn.kv_b_proj", "self_attn/kv_b_proj/kernel", LINEAR),
    ("self_attn.o_proj", "self_attn/o_proj/kernel", LINEAR),
    ("mlp.gate_proj", "mlp/gate_proj/kernel", LINEAR),
    ("mlp.up_proj", "mlp/up_proj/kernel", LINEAR),
    ("mlp.down_proj", "mlp/down_proj/kernel", LINEAR),
    ("mlp.gate.weight", "mlp/gate/kernel", TRANSPOSE),
    ("mlp.gate.e_score_correction_bias", "mlp/gate/e_score_correction_bias", TENSOR),
    ("mlp.shared_experts.gate_proj", "mlp/shared_experts/gate_proj/kernel", LINEAR),
    ("mlp.shared_experts.up_proj", "mlp/shared_experts/up_proj/kernel", LINEAR),
    ("mlp.shared_experts.down_proj", "mlp/shared_experts/down_proj/kernel", LINEAR),
    ("mlp.experts.{e}.gate_proj", "mlp/experts/gate_proj/kernel", LINEAR),
    ("mlp.experts.{e}.up_proj", "mlp/experts/up_proj/kernel", LINEAR),
    ("mlp.experts.{e}.down_proj", "mlp/experts/down_proj/kernel", LINEAR),
)


@dataclasses.dataclass(frozen=True)
class Item:
    """One hub tensor (or linear module) and the slice of a tree leaf it fills.

    `source`/`target` are the unstacked abstract leaves (a `jax.ShapeDtypeStruct` or a
    `QuantizedWeight` of them) in the source and target configs; `index` is the position along
    the leaf's stacked leading axes: `()`, `(layer,)` or `(layer, expert)`.
    """

    hf: str
    leaf: tuple[str, ...]
    index: tuple[int, ...]
    kind: str
    source: Any
    target: Any


@dataclasses.dataclass(frozen=True)
class Unit:
    """The resumable piece of work: `top` (embedding, final norm, lm_head) or one layer."""

    name: str
    items: tuple[Item, ...]


def abstract_leaves(config: ModelConfig) -> dict[tuple[str, ...], Any]:
    """`param_shapes(config)` flattened to `{path: leaf}`, a `QuantizedWeight` being one leaf."""
    is_qw = lambda x: isinstance(x, quant.QuantizedWeight)  # noqa: E731
    flat, _ = jax.tree_util.tree_flatten_with_path(param_shapes(config), is_leaf=is_qw)
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def _unstack(leaf, n: int):
    drop = lambda s: jax.ShapeDtypeStruct(s.shape[n:], s.dtype)  # noqa: E731
    if isinstance(leaf, quant.QuantizedWeight):
        return quant.QuantizedWeight(drop(leaf.values), drop(leaf.scale))
    return drop(leaf)


def plan(source: ModelConfig, target: ModelConfig) -> list[Unit]:
    """Every hub tensor of `source`, grouped into units, with its place in `target`'s tree."""
    src, tgt = abstract_leaves(source), abstract_leaves(target)
    covered = set()

    def item(hf, leaf, index, kind):
        covered.add(leaf)
        return Item(hf, leaf, index, kind, _unstack(src[leaf], len(index)),
                    _unstack(tgt[leaf], len(index)))

    units = [Unit("top", tuple(item(hf, tuple(p.split("/")), (), kind)
                               for hf, p, kind in TOP_RULES))]
    for i in range(source.num_hidden_layers):
        stack, li = source.stack_of_layer(i)
        items = []
        for hf, p, kind in LAYER_RULES:
            leaf = (stack, *p.split("/"))
            if leaf not in src:
                continue
            prefix = f"model.layers.{i}."
            if "{e}" in hf:
                items += [item(prefix + hf.format(e=e), leaf, (li, e), kind)
                          for e in range(source.n_routed_experts)]
            else:
                items.append(item(prefix + hf, leaf, (li,), kind))
        units.append(Unit(f"layer_{i:05d}", tuple(items)))
    assert covered == set(src), f"tree leaves without a hub rule: {set(src) - covered}"
    return units


def tree_from_hub(config: ModelConfig, read: Callable[[str], np.ndarray]):
    """The k2jax parameter tree (numpy leaves, `config`'s dtypes and INT4 groups) of a hub
    checkpoint whose tensors `read(hub name)` returns: `plan`'s table, in memory."""
    leaves = {}
    for path, leaf in abstract_leaves(config).items():
        empty = lambda s: np.empty(s.shape, s.dtype)  # noqa: E731
        leaves[path] = (quant.QuantizedWeight(empty(leaf.values), empty(leaf.scale))
                        if isinstance(leaf, quant.QuantizedWeight) else empty(leaf))
    for unit in plan(config, config):
        for item in unit.items:
            value, leaf = from_hub(item, read), leaves[item.leaf]
            if isinstance(leaf, quant.QuantizedWeight):
                leaf.values[item.index], leaf.scale[item.index] = value.values, value.scale
            else:
                leaf[item.index] = value
    tree: dict = {}
    for path, leaf in leaves.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


# ---- hub tensors of an item ----------------------------------------------------------------

def is_int4(item: Item) -> bool:
    return isinstance(item.source, quant.QuantizedWeight)


@dataclasses.dataclass(frozen=True)
class Fp8Blocks:
    """FP8 block quantization from `quantization_config`: `weight_block_size` (bo, bi)."""

    block: tuple[int, int]

    def scale_shape(self, dout: int, din: int) -> tuple[int, int]:
        return (math.ceil(dout / self.block[0]), math.ceil(din / self.block[1]))


def hub_tensors(item: Item, fp8: Fp8Blocks | None = None) -> dict[str, tuple[tuple, tuple]]:
    """`{hub name: (shape, allowed safetensors dtypes)}` that hold `item` in the source
    (`fp8`: the linear is stored block-quantized)."""
    src = item.source
    if item.kind == TENSOR:
        return {item.hf: (tuple(src.shape), FLOATS)}
    if item.kind == TRANSPOSE:
        return {item.hf: (tuple(src.shape[::-1]), FLOATS)}
    if is_int4(item):
        din, dout = src.values.shape
        return {f"{item.hf}.weight_packed": ((dout, din // 8), ("I32",)),
                f"{item.hf}.weight_scale": ((dout, src.scale.shape[0]), FLOATS),
                f"{item.hf}.weight_shape": ((2,), ("I64", "I32"))}
    din, dout = src.shape
    if fp8:
        return {f"{item.hf}.weight": ((dout, din), ("F8_E4M3",)),
                f"{item.hf}.weight_scale_inv": (fp8.scale_shape(dout, din), FLOATS)}
    return {f"{item.hf}.weight": ((dout, din), FLOATS)}


# ---- reading and writing an item ----------------------------------------------------------

def _cast(x: np.ndarray, like) -> np.ndarray:
    return np.ascontiguousarray(x.astype(like.dtype, copy=False))


def from_hub(item: Item, read: Callable[[str], np.ndarray], fp8: Fp8Blocks | None = None):
    """Reads `item`'s hub tensors and returns its value in the target layout and dtype:
    a numpy array, or a `QuantizedWeight` of numpy arrays."""
    src, tgt = item.source, item.target
    if item.kind == TENSOR:
        return _cast(read(item.hf), tgt)
    if item.kind == TRANSPOSE:
        return compressed_tensors.transpose(_cast(read(item.hf), tgt))
    if is_int4(item):
        qw = compressed_tensors.unpack(read(f"{item.hf}.weight_packed"),
                                    read(f"{item.hf}.weight_scale"),
                                    read(f"{item.hf}.weight_shape"))
        if qw.values.shape != src.values.shape:
            raise ValueError(f"weight_shape gives [in, out] = {list(qw.values.shape)}, "
                             f"config.json implies {list(src.values.shape)}")
        if not isinstance(tgt, quant.QuantizedWeight):
            return _cast(np.asarray(quant.dequantize(qw, tgt.dtype)), tgt)
        scale = qw.scale.astype(tgt.scale.dtype)
        if not np.array_equal(scale.astype(qw.scale.dtype), qw.scale):
            raise ValueError(f"weight_scale is {qw.scale.dtype} and not exactly "
                             f"{tgt.scale.dtype}; convert with --dtype bfloat16 to dequantize")
        return quant.QuantizedWeight(qw.values, scale)
    w = read(f"{item.hf}.weight")
    if fp8:
        w = transforms.dequantize_fp8(w, read(f"{item.hf}.weight_scale_inv"), fp8.block)
    return compressed_tensors.transpose(_cast(w, tgt))


# safetensors dtype written for each numpy dtype on export.
_EXPORT_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
                  np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
                  np.dtype(np.int64): "I64"}


def export_specs(item: Item) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{hub name: (shape, safetensors dtype)}` that `to_hub(item, ...)` returns."""
    tgt = item.target
    if is_int4(item):
        din, dout = tgt.values.shape
        return {f"{item.hf}.weight_packed": ((dout, din // 8), "I32"),
                f"{item.hf}.weight_scale": ((dout, tgt.scale.shape[0]),
                                            _EXPORT_DTYPES[np.dtype(tgt.scale.dtype)]),
                f"{item.hf}.weight_shape": ((2,), "I64")}
    shape = tuple(tgt.shape) if item.kind == TENSOR else tuple(tgt.shape[::-1])
    name = item.hf if item.kind != LINEAR else f"{item.hf}.weight"
    return {name: (shape, _EXPORT_DTYPES[np.dtype(tgt.dtype)])}


def to_hub(item: Item, value) -> dict[str, np.ndarray]:
    """Inverse of `from_hub` for an unquantized-or-INT4 checkpoint: the hub tensors of `value`."""
    if is_int4(item):
        return {f"{item.hf}.{k}": v for k, v in compressed_tensors.pack(value).items()}
    if item.kind == TENSOR:
        return {item.hf: np.ascontiguousarray(value)}
    name = item.hf if item.kind == TRANSPOSE else f"{item.hf}.weight"
    return {name: compressed_tensors.transpose(value)}


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def extra_layer(name: str, config: ModelConfig, nextn: int) -> bool:
    """Whether `name` belongs to a multi-token-prediction layer past the decoder's layers."""
    m = _LAYER.match(name)
    return bool(m) and config.num_hidden_layers <= int(m.group(1)) < (
        config.num_hidden_layers + nextn)
