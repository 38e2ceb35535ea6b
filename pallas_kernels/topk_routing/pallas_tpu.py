"""Fused router as a Mosaic TPU Pallas kernel: one grid step per tile of tokens.

The experts are padded to a multiple of 128 lanes (384 needs none) with bias -inf; the outputs
use `next_power_of_2(top_k)` columns like the Triton kernel, sliced afterwards.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.topk_routing import tile

_LANES = 128


@dataclasses.dataclass(frozen=True)
class Config:
    """`block_t` tokens per grid step (a multiple of 8; all tokens when fewer)."""

    block_t: int = 256


@functools.partial(jax.jit, static_argnames=(
    "top_k", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "config",
    "interpret"))
def route(router_logits_te: jax.Array, bias_e: jax.Array, *, top_k: int, n_group: int,
          topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float,
          config: Config | None = None, interpret: bool = False):
    """See `reference.route`: weights float32 `[T, K]`, indices int32 `[T, K]`."""
    cfg = config or Config()
    tokens, num_experts = router_logits_te.shape
    width = pl.cdiv(num_experts, _LANES) * _LANES
    logits, bias, kernel, k_width = tile.prologue(
        router_logits_te, bias_e, width, top_k=top_k, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor)
    bt = min(cfg.block_t, tokens)
    weights, indices = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((tokens, k_width), jnp.float32),
                   jax.ShapeDtypeStruct((tokens, k_width), jnp.int32)),
        grid=(pl.cdiv(tokens, bt),),
        in_specs=[pl.BlockSpec((bt, width), lambda t: (t, 0)),
                  pl.BlockSpec((1, width), lambda t: (0, 0))],
        out_specs=(pl.BlockSpec((bt, k_width), lambda t: (t, 0)),
                   pl.BlockSpec((bt, k_width), lambda t: (t, 0))),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="topk_routing",
    )(logits, bias)
    return weights[:, :top_k], indices[:, :top_k]
