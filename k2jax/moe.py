"""Feed-forward blocks: the dense SwiGLU MLP and the mixture of experts.

The MoE runs in four named steps: route (sigmoid, bias-corrected group-limited top-k),
permute (sort token copies by expert), expert SwiGLU (grouped matmuls, no token dropping) and
unpermute (scatter back, weight, sum over k). Shared experts run densely beside them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.config import ModelConfig
from k2jax.layers import ExpertLinear, Linear, param_with_axes
from pallas_kernels.topk_routing import route


class MLP(nn.Module):
    """SwiGLU `down(silu(gate(x)) * up(x))`: `[..., D] -> [..., D]`."""

    config: ModelConfig
    intermediate_size: int
    group: str  # the LINEAR_GROUPS entry deciding INT4 storage: "dense_mlp" or "shared_experts"
    qat: bool = False

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        d, f = cfg.hidden_size, self.intermediate_size
        kw = dict(dtype=dtype, param_dtype=dtype, quantized=cfg.is_quantized(self.group),
                  qat=self.qat, group_size=cfg.quant_group_size, init_std=cfg.initializer_range)
        self.gate_proj = Linear(d, f, ("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Router weights `kernel [D, E]` and the `e_score_correction_bias [E]`, both float32.

    The bias is load-balancing state, not a weight: it only shifts which experts are selected,
    never the combine weights, and receives no gradient.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_td):
        cfg = self.config
        kernel_de = param_with_axes(self, "kernel", nn.initializers.normal(cfg.initializer_range),
                                    (cfg.hidden_size, cfg.n_routed_experts), jnp.float32,
                                    ("embed", "router"))
        bias_e = param_with_axes(self, "e_score_correction_bias", nn.initializers.zeros,
                                 (cfg.n_routed_experts,), jnp.float32, ("router",))
        logits_te = jnp.einsum("td,de->te", x_td.astype(jnp.float32),
                               kernel_de.astype(jnp.float32))
        return route(logits_te, jax.lax.stop_gradient(bias_e), top_k=cfg.num_experts_per_tok,
                     n_group=cfg.n_group, topk_group=cfg.topk_group,
                     norm_topk_prob=cfg.norm_topk_prob,
                     routed_scaling_factor=cfg.routed_scaling_factor)


def permute(x_td, indices_tk, num_experts):
    """Copies each token once per chosen expert and sorts the copies by expert.

    Returns `x_sorted [T*K, D]`, `group_sizes [E]` (copies per expert) and `order [T*K]`, the
    flat `(token, slot)` index of each sorted row.
    """
    top_k = indices_tk.shape[1]
    experts_flat = indices_tk.reshape(-1)
    order = jnp.argsort(experts_flat, stable=True)
    group_sizes_e = jnp.bincount(experts_flat, length=num_experts).astype(jnp.int32)
    return x_td[order // top_k], group_sizes_e, order


def unpermute(y_sorted_md, order, weights_tk):
    """Inverse of `permute`, then the weighted sum over each token's k experts: `[T, D]`."""
    num_tokens, top_k = weights_tk.shape
    y_flat = jnp.zeros_like(y_sorted_md).at[order].set(y_sorted_md, unique_indices=True)
    y_tkd = y_flat.reshape(num_tokens, top_k, -1)
    out = jnp.einsum("tkd,tk->td", y_tkd.astype(jnp.float32), weights_tk)
    return out.astype(y_sorted_md.dtype)


class RoutedExperts(nn.Module):
    """The routed experts' stacked SwiGLU weights `[E, D, M]`, `[E, D, M]`, `[E, M, D]`."""

    config: ModelConfig
    qat: bool = False

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        e, d, m = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        kw = dict(dtype=dtype, param_dtype=dtype, quantized=cfg.is_quantized("routed_experts"),
                  qat=self.qat, group_size=cfg.quant_group_size, init_std=cfg.initializer_range)
        self.gate_proj = ExpertLinear(e, d, m, ("expert", "embed", "expert_mlp"), **kw)
        self.up_proj = ExpertLinear(e, d, m, ("expert", "embed", "expert_mlp"), **kw)
        self.down_proj = ExpertLinear(e, m, d, ("expert", "expert_mlp", "embed"), **kw)

    def __call__(self, x_sorted_md, group_sizes_e):
        gate = self.gate_proj(x_sorted_md, group_sizes_e)
        up = self.up_proj(x_sorted_md, group_sizes_e)
        return self.down_proj(nn.silu(gate) * up, group_sizes_e)


class MoE(nn.Module):
    """Routed experts plus shared experts: `[B, T, D] -> ([B, T, D], expert_load [E])`."""

    config: ModelConfig
    qat: bool = False

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.config
        x_td = x_btd.reshape(-1, x_btd.shape[-1])
        weights_tk, indices_tk = Router(cfg, name="gate")(x_td)
        x_sorted, group_sizes_e, order = permute(x_td, indices_tk, cfg.n_routed_experts)
        y_sorted = RoutedExperts(cfg, self.qat, name="experts")(x_sorted, group_sizes_e)
        y_td = unpermute(y_sorted, order, weights_tk)
        if cfg.n_shared_experts:
            y_td = y_td + MLP(cfg, cfg.shared_intermediate_size, "shared_experts", self.qat,
                              name="shared_experts")(x_td)
        return y_td.reshape(x_btd.shape), group_sizes_e
