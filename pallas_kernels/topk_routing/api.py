"""Entry point of the router: the fused Pallas kernel on GPU/TPU, the reference elsewhere.

The kernels return the same weights and indices as `reference.route`, and take its gradient
(the weights' in the logits at the chosen experts; none in the bias).
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import common
from pallas_kernels.topk_routing import pallas_tpu, pallas_triton, reference


def route(router_logits_te: jax.Array, bias_e: jax.Array, *, top_k: int, n_group: int = 1,
          topk_group: int = 1, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
          impl: str = "auto", platform: str | None = None, interpret: bool = False,
          config: pallas_triton.Config | pallas_tpu.Config | None = None
          ) -> tuple[jax.Array, jax.Array]:
    """Routes tokens to experts; see `reference.route` for the semantics.

    Args:
      router_logits_te: float32 `[T, E]`; bias_e: float32 `[E]` (selection only).
      impl: "auto" (Pallas on GPU/TPU, the XLA reference on CPU), "reference" or "pallas".
      platform: which Pallas kernel, "gpu" (Triton) or "tpu"; defaults to the default backend.
      interpret: run the Pallas kernel in interpret mode (tests on CPU).
      config: the kernel's token tile.
    Returns:
      weights float32 `[T, K]` (differentiable in the logits), indices int32 `[T, K]`.
    """
    params = dict(top_k=top_k, n_group=n_group, topk_group=topk_group,
                  norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor)
    chosen = common.resolve(impl, platform, interpret)
    if chosen == "reference":
        return reference.route(router_logits_te, bias_e, **params)
    backend = pallas_triton if chosen == "triton" else pallas_tpu
    kernel = functools.partial(backend.route, config=config, interpret=interpret, **params)
    return common.with_reference_vjp(kernel, functools.partial(reference.route, **params))(
        router_logits_te, bias_e)
