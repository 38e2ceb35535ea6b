"""Where the training state and batches live: the mesh and every sharding, in one place.

The mesh and the parameter rules are `k2jax.sharding`'s (axes data, fsdp, expert, tensor); the
default mesh puts every device on fsdp, which splits parameters and optimizer state as well as
the batch. Optimizer-state leaves take the sharding of the parameter whose path their own path
ends with (AdamW's and Muon's moments under masks and partitions included); step counters and
other scalars are replicated.

Every process holds the same global batch (see `train.data`), so `put_batch` builds each global
array from the local numpy batch by indexing; this is the same call on one CPU and on a pod.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from k2jax import sharding
from k2jax.config import ModelConfig
from train import qat


def build_mesh(spec: str | None):
    """The training mesh; `spec` like "fsdp=4,expert=2", None for fsdp over all devices.

    Multi-process runs (detected from the environment) start `jax.distributed` first.
    """
    sharding.initialize_distributed()
    return sharding.make_mesh(spec or f"fsdp={jax.device_count()}")


def replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def _key_name(key) -> str | None:
    return getattr(key, "key", None)


def _like_params(tree, param_shardings: dict, mesh):
    """Shardings for a tree whose leaves sit under parameter paths (optimizer states)."""
    def one(path, leaf):
        names = tuple(_key_name(k) for k in path)
        for start in range(len(names)):
            target = param_shardings.get(names[start:])
            if target is not None and target[1] == tuple(leaf.shape):
                return target[0]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(state, config: ModelConfig, mesh):
    """Shardings of `{"step", "params", "opt_state"}` (arrays or `ShapeDtypeStruct`s)."""
    params = sharding.param_shardings(config, mesh, state["params"])
    leaves = qat.flat(state["params"])
    by_path = {p: (s, tuple(leaves[p].shape)) for p, s in qat.flat(params).items()}
    return {"step": replicated(mesh), "params": params,
            "opt_state": _like_params(state["opt_state"], by_path, mesh)}


def batch_shardings(batch, mesh):
    """Micro-batched inputs `[A, B/A, T]`: the row axis split over the batch mesh axes."""
    return {k: NamedSharding(mesh, sharding.logical_spec((None, "batch", None), mesh, v.shape))
            for k, v in batch.items()}


def put_batch(batch: dict[str, np.ndarray], shardings: dict):
    """Global arrays from the (identical on every process) numpy batch."""
    return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda index, v=v: v[index])
            for k, v in batch.items()}
