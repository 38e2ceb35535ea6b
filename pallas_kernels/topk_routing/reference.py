"""Pure-JAX DeepSeek-V3 / Kimi K2 router: sigmoid scores, bias-corrected group-limited top-k.

Selection uses `sigmoid(logits) + bias`; the returned weights are the *unbiased* sigmoid scores
of the chosen experts, normalised over the k chosen (when `norm_topk_prob`) and multiplied by
`routed_scaling_factor`. Indices come in descending order of the biased score, ties to the
lowest index (as `lax.top_k`).
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=(
    "top_k", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor"))
def route(router_logits_te: jax.Array, bias_e: jax.Array, *, top_k: int, n_group: int = 1,
          topk_group: int = 1, norm_topk_prob: bool = True,
          routed_scaling_factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Routes tokens to experts.

    Args:
      router_logits_te: float32 `[T, E]` router logits.
      bias_e: float32 `[E]` `e_score_correction_bias` (selection only, never differentiated).
    Returns:
      weights float32 `[T, K]`, indices int32 `[T, K]`.
    """
    num_tokens, num_experts = router_logits_te.shape
    scores_te = jax.nn.sigmoid(router_logits_te.astype(jnp.float32))
    choice_te = scores_te + jax.lax.stop_gradient(bias_e.astype(jnp.float32))
    if n_group > 1:
        per_group = num_experts // n_group
        choice_tgx = choice_te.reshape(num_tokens, n_group, per_group)
        # A group's score is the sum of its two best (biased) experts.
        group_scores_tg = jax.lax.top_k(choice_tgx, 2)[0].sum(-1)
        _, kept_groups = jax.lax.top_k(group_scores_tg, topk_group)
        group_mask_tg = jnp.zeros((num_tokens, n_group), bool).at[
            jnp.arange(num_tokens)[:, None], kept_groups].set(True)
        choice_te = jnp.where(jnp.repeat(group_mask_tg, per_group, axis=1), choice_te, -jnp.inf)
    _, indices_tk = jax.lax.top_k(jax.lax.stop_gradient(choice_te), top_k)
    weights_tk = jnp.take_along_axis(scores_te, indices_tk, axis=-1)
    if norm_topk_prob:
        # Summed left to right in selection order, an order the Pallas kernels reproduce.
        total_t1 = functools.reduce(operator.add, [weights_tk[:, j:j + 1] for j in range(top_k)])
        weights_tk = weights_tk / (total_t1 + 1e-20)
    return weights_tk * routed_scaling_factor, indices_tk.astype(jnp.int32)
