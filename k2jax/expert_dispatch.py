"""The MoE's local dispatch: sort token copies by expert (`permute`), run each expert's SwiGLU
on its rows with grouped matmuls (`expert_swiglu`), scatter back and weight-sum (`unpermute`).

Shared by `k2jax.moe` (one device, or experts not split) and `k2jax.expert_parallel` (the same
steps on each device's local experts, between the all-to-alls), below both.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import grouped_matmul


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


def expert_swiglu(x_md, group_sizes_e, gate_edm, up_edm, down_emd, dtype):
    """Expert-sorted rows `x [M, D]` through their experts' SwiGLU -> `[M, D]`.

    Kernels are arrays or INT4 `QuantizedWeight`s; rows past `sum(group_sizes)` give zeros.
    The implementation is the grouped matmul op's choice for the backend (`grouped_matmul.choose`).
    """
    return grouped_matmul.expert_swiglu(x_md, gate_edm, up_edm, down_emd, group_sizes_e, dtype)
