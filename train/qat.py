"""INT4 quantization-aware training: which leaves are fake-quantized, master weights, export.

Training keeps a float32 master copy of every parameter. Each step the model sees
`compute_params(master)`: the leaves of the QAT groups through `k2jax.quant.fake_quantize`
(compressed-tensors rounding, straight-through gradient), every leaf cast to the dtype the model
declares for it (the compute dtype; the router stays float32). Fake quantization is applied to the
parameter tree rather than through the model's global `qat` flag so that only the chosen groups
are quantized (the flag covers every linear) and so that it also holds on the expert-parallel
path, which reads the expert kernels directly.

`export_params` quantizes the same master leaves with `k2jax.quant.quantize`, the function
`fake_quantize` rounds with, so the INT4 checkpoint holds exactly the weights training saw.

Starting from an INT4 checkpoint, `master_from_quantized` picks master weights whose fake
quantization is the checkpoint's INT4 weight bit for bit. Plain dequantized values do not have
that property: with `scale = absmax / 7.5` the group's extreme element dequantizes to 7 or 8
scale steps, not 7.5, so re-quantizing would change every group's scale by 14/15 or 16/15.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import traverse_util

from k2jax import quant
from k2jax.api import param_shapes
from k2jax.config import LINEAR_GROUPS, ModelConfig

# Quotients that re-create a group's `absmax / 7.5 = scale` (a factor within half a bf16 ulp of
# 1 rounds back to the same bf16 scale; 2**-12 is well inside it) and round back to the stored
# extreme: past 7.5 for -8 (and +7, which clips), short of it for -7. Not 7.5 itself: XLA's CPU
# division is off by an ulp, enough to tip a tie.
_PAST_HALF_STEP = 7.5 * (1 + 2.0 ** -12)
_SHORT_OF_HALF_STEP = 7.5 * (1 - 2.0 ** -12)


def path_group(path: tuple[str, ...]) -> str | None:
    """The `train.config.PARAM_GROUPS` entry of a parameter path; None for the router bias.

    Attention's own norms (q_a_layernorm, kv_a_layernorm) belong to "attention"; "norms" are
    the pre-attention, pre-ffn and final RMSNorms.
    """
    if path[-1] == "e_score_correction_bias":
        return None
    if path[0] == "embed_tokens":
        return "embed"
    if path[0] == "lm_head":
        return "lm_head"
    if "self_attn" in path:
        return "attention"
    if path[0] == "norm" or path[-2] in ("input_layernorm", "post_attention_layernorm"):
        return "norms"
    if "shared_experts" in path:
        return "shared_experts"
    if "experts" in path:
        return "routed_experts"
    if "gate" in path:
        return "router"
    if path[0] == "dense_layers":
        return "dense_mlp"
    raise ValueError(f"parameter {'/'.join(path)} belongs to no known group")


def is_qat_leaf(path: tuple[str, ...], qat_groups) -> bool:
    """A linear kernel of one of `qat_groups` (norm scales in "attention" are not linears)."""
    return path[-1] == "kernel" and path_group(path) in qat_groups


@functools.lru_cache(maxsize=8)
def declared_dtypes(config: ModelConfig) -> dict[tuple[str, ...], jnp.dtype]:
    """The dtype the model declares for each parameter path of `config`."""
    return {path: leaf.dtype for path, leaf in flat(param_shapes(config)).items()}


def flat(tree) -> dict[tuple[str, ...], object]:
    return traverse_util.flatten_dict(tree)


def unflat(leaves: dict[tuple[str, ...], object]):
    return traverse_util.unflatten_dict(leaves)


def compute_params(master, model_config: ModelConfig, qat_groups, group_size: int):
    """The tree the forward uses: QAT leaves fake-quantized, all cast to their declared dtype.

    Args:
      master: float32 parameter tree of `model_config` (which stores nothing as INT4).
      qat_groups: linear groups to fake-quantize, each kernel in groups of `group_size`
        along its input axis.
    The derivative of every output leaf with respect to its master leaf is the identity
    (straight-through estimator and casts), so gradients reach the master weights unchanged.
    """
    declared = declared_dtypes(model_config)
    out = {}
    for path, w in flat(master).items():
        if is_qat_leaf(path, qat_groups):
            w = quant.fake_quantize(w, group_size)
        out[path] = w.astype(declared[path])
    return unflat(out)


def master_from_quantized(qw: quant.QuantizedWeight) -> jax.Array:
    """float32 `[..., in, out]` whose `quantize` is `qw` bit for bit (see the module docstring).

    Every element is `value * scale` except, per group, the elements of the largest magnitude,
    which move to just past 7.5 scale steps (+7 and -8) or just short of it (-7), so the group's
    absmax is again 7.5 * scale. Groups whose largest magnitude is below 7 (not produced by this
    rounding) keep `value * scale` and re-quantize to a different scale.
    """
    *lead, din, dout = qw.values.shape
    groups = qw.scale.shape[-2]
    v = qw.values.astype(jnp.float32).reshape(*lead, groups, din // groups, dout)
    s = qw.scale.astype(jnp.float32)[..., None, :]
    vmax = jnp.max(jnp.abs(v), axis=-2, keepdims=True)
    extreme = (jnp.abs(v) == vmax) & (vmax >= 7)
    steps = jnp.where(v == -7, -_SHORT_OF_HALF_STEP, jnp.sign(v) * _PAST_HALF_STEP)
    w = jnp.where(extreme, steps, v) * s
    return w.reshape(*lead, din, dout)


def master_params(params):
    """float32 master tree of a loaded parameter tree (`QuantizedWeight` leaves included)."""
    def to_master(leaf):
        if isinstance(leaf, quant.QuantizedWeight):
            return master_from_quantized(leaf)
        return leaf.astype(jnp.float32)

    return jax.tree.map(to_master, params, is_leaf=lambda x: isinstance(x, quant.QuantizedWeight))


def export_config(config: ModelConfig, qat_groups, dtype: str) -> ModelConfig:
    """The config of the exported model: the QAT groups stored as INT4, weights in `dtype`."""
    return config.replace(quantized_linears=tuple(g for g in LINEAR_GROUPS if g in qat_groups),
                          dtype=dtype)


def export_params(master, config: ModelConfig, qat_groups, dtype: str = "bfloat16"):
    """`(config, params)` of the trained model with the QAT groups as INT4 `QuantizedWeight`s.

    The INT4 leaves are `quantize(master)`, exactly the weights the QAT forward used; the other
    leaves are cast to the dtypes `config` declares (router float32, the rest `dtype`).
    """
    out_config = export_config(config, qat_groups, dtype)
    declared = declared_dtypes(out_config.replace(quantized_linears=()))
    out = {}
    for path, w in flat(master).items():
        if is_qat_leaf(path, qat_groups):
            out[path] = quant.quantize(w, config.quant_group_size)
        else:
            out[path] = w.astype(declared[path])
    return out_config, unflat(out)
