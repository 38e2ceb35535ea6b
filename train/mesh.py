"""Where the training state and batches live: the mesh and every sharding, in one place.

The mesh and the parameter rules are `k2jax.sharding`'s (axes data, fsdp, expert, tensor); the
default mesh puts every device on fsdp, which splits parameters and optimizer state as well as
the batch. Optimizer-state leaves take the sharding of the parameter whose path their own path
ends with (AdamW's and Muon's moments under masks and partitions included); step counters and
other scalars are replicated.

Each process packs only the rows of the global batch its devices hold (`local_rows`, see
`train.data.BatchStreams`), and `put_batch` builds each global array from the process's numpy
batch by indexing, asking only for its own shards; this is the same call on one CPU and on a
pod. `gather_positions` combines the processes' data positions for a checkpoint.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from k2jax import param_sharding, sharding
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
    params = param_sharding.param_shardings(config, mesh, state["params"])
    leaves = qat.flat(state["params"])
    by_path = {p: (s, tuple(leaves[p].shape)) for p, s in qat.flat(params).items()}
    return {"step": replicated(mesh), "params": params,
            "opt_state": _like_params(state["opt_state"], by_path, mesh)}


def batch_shardings(batch, mesh):
    """Micro-batched inputs `[A, B/A, T]`: the row axis split over the batch mesh axes."""
    return {k: NamedSharding(mesh, sharding.logical_spec((None, "batch", None), mesh, v.shape))
            for k, v in batch.items()}


def local_rows(sharding, shape: tuple[int, int, int]) -> set[int]:
    """The rows `a * (B/A) + j` of the global batch, laid out `[A, B/A, T]`, that this
    process's devices hold under `sharding`."""
    accum, per_micro, _ = shape
    rows = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        micro = range(accum)[index[0]]
        within = range(per_micro)[index[1]]
        rows.update(a * per_micro + j for a in micro for j in within)
    return rows


def _max_over_processes(values: np.ndarray) -> np.ndarray:
    """The elementwise maximum of every process's `values` (all processes call it together)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values)).max(axis=0)


def gather_positions(positions: np.ndarray) -> np.ndarray:
    """Every process's `BatchStreams.positions()` combined (-1 marks another's stream)."""
    return _max_over_processes(positions)


def max_over_processes(value: int) -> int:
    """The largest of every process's `value`: a signal that reached one host stops every
    host at the same step."""
    return int(_max_over_processes(np.int32(value)))


def put_batch(batch: dict[str, np.ndarray], shardings: dict):
    """Global arrays from this process's numpy batch (its rows filled; see `local_rows`)."""
    return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda index, v=v: v[index])
            for k, v in batch.items()}
