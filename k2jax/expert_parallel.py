"""Expert parallelism: tokens travel to the devices holding their experts and back.

Used by the MoE layer when the current mesh splits the routed experts (`E` over the mesh axes
`RULES` gives "expert", i.e. fsdp x expert). Per device, inside one `shard_map`:

  route      (outside, global)  weights_tk, indices_tk from the router
  permute    sort this device's T*K token copies by expert; experts are owned in contiguous
             blocks of E_loc = E / P, so the copies for each device are contiguous too
  dispatch   all-to-all over the expert-parallel group of P devices
  experts    local SwiGLU on the E_loc local experts with grouped matmuls (`expert_dispatch.expert_swiglu`)
  combine    the reverse all-to-all, then un-sort and weight-sum the k copies (`expert_dispatch.unpermute`);
             a psum over "tensor" when the expert width M is split over it

Two dispatch implementations, equal in result, both dropless by default:
- "dense": `all_to_all` of a fixed `[P, C, D]` buffer per device. Works on every backend;
  XLA:CPU has nothing else.
- "ragged": `ragged_all_to_all` of the exact rows (GPU/TPU) into a `[P * C, D]` receive buffer.
"auto" picks ragged where the backend implements it. C, the rows one device may send another,
is the dropless worst case T_loc * min(K, E_loc), a P-fold over-provision of the even share
T_loc * K / P; a `capacity_factor` sets C to that multiple of the even share instead, and
copies past it are dropped (weighted zero), the same ones in both implementations.

Tokens are split over all batch axes (data, fsdp, expert), padded to a multiple of their count;
data-parallel ranks hold their own copy of the experts and never exchange tokens.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from k2jax import quant, sharding
from k2jax.expert_dispatch import expert_swiglu, unpermute

GATE_UP_AXES = ("expert", "embed", "expert_mlp")
DOWN_AXES = ("expert", "expert_mlp", "embed")


def _shapes(w):
    if isinstance(w, quant.QuantizedWeight):
        return (w.values.shape, w.scale.shape)
    return (w.shape,)


def _spec(w, axes, mesh):
    spec = sharding.logical_spec(axes, mesh, *_shapes(w))
    return quant.QuantizedWeight(spec, spec) if isinstance(w, quant.QuantizedWeight) else spec


def _names(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def expert_axes(mesh, num_experts: int) -> tuple[str, ...]:
    """Mesh axes (size > 1) that split `E` experts: the expert-parallel group; () if none.

    Raises `sharding.MeshError` when the group's axes do not split `E` evenly, rather than
    running with the experts replicated."""
    if mesh is None:
        return ()
    wanted = _names(sharding.logical_spec(("expert",), mesh)[0])
    sharding.check_split(mesh, "routed experts", num_experts, wanted)
    return _names(sharding.logical_spec(("expert",), mesh, (num_experts,))[0])


def _token_axes(mesh) -> tuple[str, ...]:
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return tuple(a for a in sharding.BATCH_AXES if sizes.get(a, 1) > 1)


def _route_rows(indices_tk, experts_per_device: int, num_devices: int):
    """Sorts this device's token copies by expert; where each goes and at which row.

    Returns `order [T*K]` (flat (token, slot) index of each sorted copy), `dest [T*K]` (device),
    `slot [T*K]` (row among the copies sent to `dest`), `local_expert [T*K]` (expert index on
    `dest`), `send_counts [P]` and `send_starts [P]` (offsets of each device's rows).
    """
    experts_flat = indices_tk.reshape(-1)
    order = jnp.argsort(experts_flat, stable=True)
    expert_sorted = experts_flat[order]
    dest = expert_sorted // experts_per_device
    send_counts = jnp.bincount(dest, length=num_devices).astype(jnp.int32)
    send_starts = jnp.cumsum(send_counts) - send_counts
    slot = jnp.arange(dest.shape[0], dtype=jnp.int32) - send_starts[dest]
    return order, dest, slot, expert_sorted - dest * experts_per_device, send_counts, send_starts


def _local_experts(x_rd, local_expert_r, experts_per_device, kernels, dtype):
    """Received rows `[R, D]` through their local experts; ids == E_loc mark empty rows."""

    order = jnp.argsort(local_expert_r, stable=True)
    group_sizes = jnp.bincount(local_expert_r, length=experts_per_device).astype(jnp.int32)
    y = expert_swiglu(x_rd[order], group_sizes, *kernels, dtype)
    # Empty rows sort last, past every group, and come out of the grouped matmul as zeros.
    return jnp.zeros_like(y).at[order].set(y, unique_indices=True)


def _dense_exchange(x_sorted, dest, slot, local_expert, *, axes, num_devices, capacity,
                    experts_per_device, compute):
    """Dispatch with a fixed `[P, C, D]` all-to-all buffer, compute, and return the rows."""
    d = x_sorted.shape[-1]
    buf = jnp.zeros((num_devices, capacity, d), x_sorted.dtype).at[dest, slot].set(
        x_sorted, mode="drop", unique_indices=True)
    ids = jnp.full((num_devices, capacity), experts_per_device, jnp.int32).at[dest, slot].set(
        local_expert, mode="drop", unique_indices=True)
    a2a = functools.partial(jax.lax.all_to_all, axis_name=axes, split_axis=0, concat_axis=0,
                            tiled=True)
    y_recv = compute(a2a(buf.reshape(-1, d)), a2a(ids.reshape(-1)))
    back = a2a(y_recv).reshape(num_devices, capacity, d)
    # Copies past the capacity (only with a capacity factor) read zeros: dropped.
    return back.at[dest, slot].get(mode="fill", fill_value=0)


def ragged_all_to_all(*args, **kwargs):
    """`jax.lax.ragged_all_to_all`, named here so tests on XLA:CPU can emulate it."""
    return jax.lax.ragged_all_to_all(*args, **kwargs)


def _ragged_exchange(x_sorted, local_expert, send_counts, send_starts, *, axes, num_devices,
                     capacity, experts_per_device, compute):
    """Dispatch the exact rows with `ragged_all_to_all`, compute, and send the results back."""
    num_rows, d = x_sorted.shape
    # Past the capacity, a device's last copies for a destination stay home and come back as
    # zeros: the rows the dense buffer would drop.
    send_counts = jnp.minimum(send_counts, capacity)
    counts_pp = jax.lax.all_gather(send_counts, axes)  # [source, destination]
    me = jax.lax.axis_index(axes)
    recv_counts = counts_pp[:, me]
    recv_starts = jnp.cumsum(recv_counts) - recv_counts
    # Where this device's rows land on each receiver: after those of lower-ranked senders.
    land_starts = (jnp.cumsum(counts_pp, axis=0) - counts_pp)[me]
    # Where each sender keeps the rows it sent here: its own send offsets.
    sender_starts = jax.lax.all_gather(send_starts, axes)[:, me]
    received = num_devices * capacity
    x_recv = ragged_all_to_all(x_sorted, jnp.zeros((received, d), x_sorted.dtype), send_starts,
                               send_counts, land_starts, recv_counts, axis_name=axes)
    ids_recv = ragged_all_to_all(
        local_expert[:, None], jnp.full((received, 1), experts_per_device, jnp.int32),
        send_starts, send_counts, land_starts, recv_counts, axis_name=axes)[:, 0]
    y_recv = compute(x_recv, ids_recv)
    return ragged_all_to_all(y_recv, jnp.zeros((num_rows, d), y_recv.dtype), recv_starts,
                             recv_counts, sender_starts, send_counts, axis_name=axes)


def resolve_impl(impl: str) -> str:
    if impl not in ("auto", "dense", "ragged"):
        raise ValueError(f"expert-parallel impl must be 'auto', 'dense' or 'ragged', got {impl!r}")
    if impl == "auto":
        return "ragged" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "dense"
    return impl


def moe_expert_parallel(x_td, weights_tk, indices_tk, kernels, *, mesh, dtype,
                        impl: str = "auto", capacity_factor: float | None = None):
    """Routed experts of a whole batch, expert-parallel over `mesh`.

    Args:
      x_td: `[T, D]` tokens (any sharding; split over the batch axes here).
      weights_tk, indices_tk: the router's float32 weights and int32 expert ids `[T, K]`.
      kernels: `(gate [E, D, M], up [E, D, M], down [E, M, D])`, arrays or `QuantizedWeight`s,
        sharded by `sharding.RULES` (their specs are recomputed here, so none is resharded).
      mesh: the current mesh (`Mesh` or `AbstractMesh`) with `expert_axes(mesh, E)` non-empty.
      impl: "auto", "dense" or "ragged" (see the module docstring).
      capacity_factor: None (dropless) or rows per device pair as a multiple of the even share
        T_loc * K / P; each device keeps the copies of its lowest-numbered experts first.
    Returns:
      `[T, D]` weighted sum of each token's k expert outputs, in `x_td`'s dtype.
    """
    num_experts = _shapes(kernels[0])[0][0]
    axes = expert_axes(mesh, num_experts)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    num_devices = math.prod(sizes[a] for a in axes)
    experts_per_device = num_experts // num_devices
    token_axes = _token_axes(mesh)
    shards = math.prod(sizes[a] for a in token_axes)
    num_tokens, top_k = indices_tk.shape
    pad = -num_tokens % shards
    if pad:  # padded tokens route to expert 0 with weight 0 and are sliced off below
        x_td, weights_tk, indices_tk = (jnp.pad(a, ((0, pad), (0, 0)))
                                        for a in (x_td, weights_tk, indices_tk))
    tokens_local = (num_tokens + pad) // shards
    capacity = tokens_local * min(top_k, experts_per_device)
    impl = resolve_impl(impl)
    if capacity_factor is not None:
        even_share = tokens_local * top_k / num_devices
        capacity = max(1, min(capacity, math.ceil(capacity_factor * even_share)))

    kernel_specs = tuple(_spec(w, a, mesh) for w, a in zip(kernels, (GATE_UP_AXES,) * 2 +
                                                               (DOWN_AXES,)))
    gate_spec = kernel_specs[0].values if isinstance(kernel_specs[0], quant.QuantizedWeight) \
        else kernel_specs[0]
    width_axes = _names(gate_spec[2])  # the expert width M, split over tensor: partial sums

    def per_device(x_td, weights_tk, indices_tk, local_kernels):

        order, dest, slot, local_expert, send_counts, send_starts = _route_rows(
            indices_tk, experts_per_device, num_devices)
        x_sorted = x_td[order // top_k].astype(dtype)
        kw = dict(axes=axes, num_devices=num_devices, capacity=capacity,
                  experts_per_device=experts_per_device,
                  compute=functools.partial(_local_experts, experts_per_device=experts_per_device,
                                            kernels=local_kernels, dtype=dtype))
        if impl == "dense":
            y_sorted = _dense_exchange(x_sorted, dest, slot, local_expert, **kw)
        else:
            y_sorted = _ragged_exchange(x_sorted, local_expert, send_counts, send_starts, **kw)
        y_td = unpermute(y_sorted, order, weights_tk)
        # Every step after the expert matmuls is linear, so the partial sums over a split expert
        # width are reduced last, on T_loc rows rather than the P*C-row dispatch buffer.
        return jax.lax.psum(y_td, width_axes) if width_axes else y_td

    rows = PartitionSpec(token_axes or None, None)
    # Pin the router outputs to the token split so XLA reshards nothing at the boundary.
    x_td, weights_tk, indices_tk = (jax.lax.with_sharding_constraint(a, rows)
                                    for a in (x_td, weights_tk, indices_tk))
    y_td = jax.shard_map(per_device, mesh=mesh, in_specs=(rows, rows, rows, kernel_specs),
                         out_specs=rows)(x_td, weights_tk, indices_tk, tuple(kernels))
    return y_td[:num_tokens]
