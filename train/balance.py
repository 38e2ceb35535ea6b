"""Aux-loss-free load balancing: the routers' `e_score_correction_bias` follows expert load.

DeepSeek-V3's rule, once per optimizer step and per MoE layer: every expert that received fewer
token copies than the layer's mean has its bias raised by `rate`, every one above the mean
lowered by `rate` (`bias += rate * sign(mean_load - load)`). The bias only shifts which experts
are selected, so under-used experts win more tokens at the next step. It is the only thing that
changes the bias: it is excluded from gradients, optimizer state and weight decay.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BIAS_PATH = ("moe_layers", "mlp", "gate", "e_score_correction_bias")


def updated_bias(bias_le: jax.Array, load_le: jax.Array, rate: float) -> jax.Array:
    """New bias `[L_moe, E]` from the step's expert load `[L_moe, E]` (token copies)."""
    load = load_le.astype(jnp.float32)
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return bias_le + rate * jnp.sign(mean - load)


def balance_params(params, load_le: jax.Array, rate: float):
    """`params` with every MoE layer's router bias updated from `load_le`."""
    if load_le.shape[0] == 0 or rate == 0:
        return params
    gate = params["moe_layers"]["mlp"]["gate"]
    new_gate = {**gate, "e_score_correction_bias": updated_bias(
        gate["e_score_correction_bias"], load_le, rate)}
    return {**params, "moe_layers": {**params["moe_layers"], "mlp": {
        **params["moe_layers"]["mlp"], "gate": new_gate}}}

