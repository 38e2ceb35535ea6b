"""Feed-forward blocks: the dense SwiGLU MLP and the mixture of experts.

The MoE runs in four named steps: route (sigmoid, bias-corrected group-limited top-k),
permute (sort token copies by expert), expert SwiGLU (grouped matmuls, no token dropping) and
unpermute (scatter back, weight, sum over k). Shared experts run densely beside them.
When the current mesh splits the routed experts, permute/experts/unpermute run
expert-parallel instead (`k2jax.expert_parallel`: all-to-all dispatch and combine).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from k2jax import expert_parallel, sharding
from k2jax.config import ModelConfig
from k2jax.expert_dispatch import expert_swiglu, permute, unpermute
from k2jax.layers import ExpertLinear, Linear, param_with_axes
from pallas_kernels.topk_routing import route


class MLP(nn.Module):
    """SwiGLU `down(silu(gate(x)) * up(x))`: `[..., D] -> [..., D]`."""

    config: ModelConfig
    intermediate_size: int
    group: str  # the LINEAR_GROUPS entry deciding INT4 storage: "dense_mlp" or "shared_experts"

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        d, f = cfg.hidden_size, self.intermediate_size
        kw = dict(dtype=dtype, param_dtype=dtype, quantized=cfg.is_quantized(self.group),
                  group_size=cfg.quant_group_size, init_std=cfg.initializer_range)
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
        """`x [T, D] -> (weights [T, K], indices int32 [T, K], logits float32 [T, E])`."""
        cfg = self.config
        kernel_de = param_with_axes(self, "kernel", nn.initializers.normal(cfg.initializer_range),
                                    (cfg.hidden_size, cfg.n_routed_experts), jnp.float32,
                                    ("embed", "router"))
        bias_e = param_with_axes(self, "e_score_correction_bias", nn.initializers.zeros,
                                 (cfg.n_routed_experts,), jnp.float32, ("router",))
        logits_te = jnp.einsum("td,de->te", x_td.astype(jnp.float32),
                               kernel_de.astype(jnp.float32))
        select = functools.partial(
            route, top_k=cfg.num_experts_per_tok, n_group=cfg.n_group,
            topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor)
        bias_e = jax.lax.stop_gradient(bias_e)
        mesh = sharding.active_mesh()
        if mesh is None:
            return *select(logits_te, bias_e), logits_te
        # Routing is per token: run it on each device's rows, since XLA's partitioner gathers
        # all tokens around a top-k whose rows are split.
        rows = sharding.logical_spec(("batch", None), mesh, logits_te.shape)
        weights_tk, indices_tk = jax.shard_map(
            select, mesh=mesh, in_specs=(rows, PartitionSpec()),
            out_specs=(rows, rows))(logits_te, bias_e)
        return weights_tk, indices_tk, logits_te


class RoutedExperts(nn.Module):
    """The routed experts' stacked SwiGLU weights `[E, D, M]`, `[E, D, M]`, `[E, M, D]`."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        e, d, m = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        kw = dict(dtype=dtype, param_dtype=dtype, quantized=cfg.is_quantized("routed_experts"),
                  group_size=cfg.quant_group_size, init_std=cfg.initializer_range)
        self.gate_proj = ExpertLinear(e, d, m, expert_parallel.GATE_UP_AXES, **kw)
        self.up_proj = ExpertLinear(e, d, m, expert_parallel.GATE_UP_AXES, **kw)
        self.down_proj = ExpertLinear(e, m, d, expert_parallel.DOWN_AXES, **kw)

    def kernels(self):
        """`(gate, up, down)` kernels."""
        return tuple(p.kernel for p in (self.gate_proj, self.up_proj, self.down_proj))

    def __call__(self, x_sorted_md, group_sizes_e):
        return expert_swiglu(x_sorted_md, group_sizes_e, *self.kernels(),
                             jnp.dtype(self.config.dtype))


def sequence_balance_loss(logits_bte, indices_btk, valid_bt):
    """DeepSeek-V3's sequence-wise balance loss of one MoE layer, averaged over rows, `[]`.

    Per row, over its valid tokens: `f_e = E / (K T) * #{t : e in topk(t)}` (not differentiated)
    and `P_e = mean_t s_te / sum_e' s_te'` of the unbiased sigmoid scores; loss `sum_e f_e P_e`
    (1 when balanced).
    """
    e, k = logits_bte.shape[-1], indices_btk.shape[-1]
    scores = jax.nn.sigmoid(logits_bte.astype(jnp.float32))
    affinity = scores / jnp.sum(scores, axis=-1, keepdims=True)
    valid = valid_bt.astype(jnp.float32)[..., None]
    count_b = jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1.0)[:, None]
    chosen = jax.nn.one_hot(indices_btk, e, dtype=jnp.float32).sum(axis=2)
    f_be = jax.lax.stop_gradient(e / k * jnp.sum(chosen * valid, axis=1) / count_b)
    p_be = jnp.sum(affinity * valid, axis=1) / count_b
    return jnp.mean(jnp.sum(f_be * p_be, axis=-1))


class MoE(nn.Module):
    """Routed experts plus shared experts: `[B, T, D] -> ([B, T, D], expert_load [E],
    balance_loss [] or None)`.

    `balance_loss`: also return `sequence_balance_loss` over the tokens where `valid_bt`.
    """

    config: ModelConfig
    balance_loss: bool = False

    @nn.compact
    def __call__(self, x_btd, valid_bt=None):
        cfg = self.config
        x_td = nn.with_logical_constraint(x_btd.reshape(-1, x_btd.shape[-1]), ("batch", "embed"))
        weights_tk, indices_tk, logits_te = Router(cfg, name="gate")(x_td)
        balance = None
        if self.balance_loss:
            b, t = x_btd.shape[:2]
            valid_bt = jnp.ones((b, t), bool) if valid_bt is None else valid_bt
            balance = sequence_balance_loss(logits_te.reshape(b, t, -1),
                                            indices_tk.reshape(b, t, -1), valid_bt)
        experts = RoutedExperts(cfg, name="experts")
        mesh = sharding.active_mesh()
        if expert_parallel.expert_axes(mesh, cfg.n_routed_experts):
            y_td = expert_parallel.moe_expert_parallel(
                x_td, weights_tk, indices_tk, experts.kernels(), mesh=mesh,
                dtype=jnp.dtype(cfg.dtype), impl=cfg.expert_dispatch,
                capacity_factor=cfg.expert_capacity_factor)
            group_sizes_e = jnp.bincount(indices_tk.reshape(-1), length=cfg.n_routed_experts)
            group_sizes_e = group_sizes_e.astype(jnp.int32)
        else:
            x_sorted, group_sizes_e, order = permute(x_td, indices_tk, cfg.n_routed_experts)
            y_sorted = experts(x_sorted, group_sizes_e)
            y_td = unpermute(y_sorted, order, weights_tk)
        if cfg.n_shared_experts:
            y_td = y_td + MLP(cfg, cfg.shared_intermediate_size, "shared_experts",
                              name="shared_experts")(x_td)
        return y_td.reshape(x_btd.shape), group_sizes_e, balance
