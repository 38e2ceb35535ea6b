"""Next-token cross entropy over packed rows, weighted by the loss mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """`-log softmax(logits)[target]` per token, float32 `[B, T]`."""
    logits = logits_btv.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def weighted_loss_sum(logits_btv: jax.Array, targets_bt: jax.Array,
                      weights_bt: jax.Array) -> jax.Array:
    """Sum of `weights * cross entropy`: divided by the step's total weight it is the mean loss,
    and sums of it over micro-batches give exactly the full batch's."""
    return jnp.sum(token_cross_entropy(logits_btv, targets_bt) * weights_bt)
