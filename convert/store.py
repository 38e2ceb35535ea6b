"""Parameter-tree leaves as zarr3 arrays in Orbax's PyTree layout, written slice by slice.

`OUT/params/` holds exactly what Orbax's `PyTreeCheckpointHandler(use_ocdbt=False,
use_zarr3=True)` writes, so stock Orbax restores it:

    params/<leaf>/zarr.json        array metadata; <leaf> joins the tree path with '.', a
                                   QuantizedWeight giving `<...>.kernel.values` and `.scale`
    params/<leaf>/c/<i>/<j>/...    one file per chunk, zstd level 1 (as Orbax compresses)
    params/_METADATA               the tree: key paths and per-leaf `write_shape`
    params/_CHECKPOINT_METADATA    Orbax's step metadata, without timestamps

Chunks follow the stacking: one per layer along a leaf's `layers` axis and one per expert along
its expert axis, so each `(layer[, expert])` slice the converter writes is a set of whole chunk
files that no other slice touches: slices are written independently, in any order, and
rewriting one after an interruption replaces exactly its own files. A chunk above 64 MiB is
halved along its largest axis (embedding, lm_head, dense MLP): tensorstore compresses chunks in
parallel, and a host reads at most a chunk beyond its own shard. zstd stores int4 (a byte per
value in memory) in about half a byte.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import tensorstore as ts

CHUNK_BYTES = 64 << 20
METADATA_FILE = "_METADATA"
CHECKPOINT_METADATA_FILE = "_CHECKPOINT_METADATA"
_ZSTD = [{"name": "bytes", "configuration": {"endian": "little"}},
         {"name": "zstd", "configuration": {"level": 1, "checksum": False}}]
# tensorstore's file driver writes `<chunk>.__lock` and renames it into place; a killed writer
# leaves these behind.
_TEMP_SUFFIX = ".__lock"


def leaf_name(path: tuple[str, ...]) -> str:
    return ".".join(path)


def chunk_shape(shape: tuple[int, ...], stacked: int, itemsize: int) -> list[int]:
    """One chunk per index of the `stacked` leading axes, split until <= `CHUNK_BYTES`."""
    chunk = [1] * stacked + list(shape[stacked:])
    while math.prod(chunk) * itemsize > CHUNK_BYTES:
        axis = max(range(stacked, len(chunk)), key=lambda a: chunk[a])
        chunk[axis] = -(-chunk[axis] // 2)
    return chunk


class ArraySpec:
    """A leaf array to create: `shape`, numpy `dtype`, number of `stacked` leading axes."""

    def __init__(self, shape, dtype, stacked: int):
        self.shape, self.dtype, self.stacked = tuple(shape), np.dtype(dtype), stacked
        self.chunk = chunk_shape(self.shape, stacked, self.dtype.itemsize)

    def tensorstore_spec(self, path: str) -> dict:
        return {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": path + "/"},
            "metadata": {
                "shape": list(self.shape), "data_type": self.dtype.name,
                "chunk_grid": {"name": "regular",
                               "configuration": {"chunk_shape": self.chunk}},
                "codecs": _ZSTD, "fill_value": 0,
            },
            # Every chunk is written, zero or not, so a complete array has every chunk file.
            "store_data_equal_to_fill_value": True,
        }

    def chunk_count(self) -> int:
        return math.prod(-(-n // c) for n, c in zip(self.shape, self.chunk))


def open_arrays(params_dir: str, specs: dict[str, ArraySpec], create: bool):
    """Creates (replacing any half-created one) or reopens, to resume, every leaf array:
    `{leaf name: ts.TensorStore}`."""
    # No fsync per chunk file (it slows writing by a third): the converter syncs once per
    # unit, before marking it done.
    context = ts.Context({"file_io_sync": False})
    futures = {}
    for name, spec in specs.items():
        tspec = spec.tensorstore_spec(os.path.join(params_dir, name))
        futures[name] = (ts.open(tspec, create=True, delete_existing=True, context=context)
                         if create else ts.open(tspec, open=True, context=context))
    return {name: f.result() for name, f in futures.items()}


def remove_partial_writes(params_dir: str) -> int:
    """Deletes the temporary files of chunk writes that a killed process left; returns how many."""
    removed = 0
    for root, _, files in os.walk(params_dir):
        for f in files:
            if f.endswith(_TEMP_SUFFIX):
                os.remove(os.path.join(root, f))
                removed += 1
    return removed


def missing_chunks(params_dir: str, specs: dict[str, ArraySpec]) -> list[str]:
    """Leaves whose chunk files are not all present (a completeness check before finalizing)."""
    missing = []
    for name, spec in specs.items():
        count = sum(len(files) for _, _, files in os.walk(os.path.join(params_dir, name, "c")))
        if count != spec.chunk_count():
            missing.append(f"{name} ({count} of {spec.chunk_count()} chunks)")
    return missing


def write_metadata(params_dir: str, specs: dict[str, ArraySpec]) -> None:
    """Writes Orbax's `_METADATA` tree and `_CHECKPOINT_METADATA` for the arrays."""
    from k2jax.checkpoint import write_json_atomic

    tree = {}
    for name, spec in specs.items():
        keys = name.split(".")
        tree[str(tuple(keys))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in keys],  # 2: a dict key
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                               "write_shape": spec.chunk},
        }
    write_json_atomic(os.path.join(params_dir, METADATA_FILE), {
        "tree_metadata": tree, "use_ocdbt": False, "use_zarr3": True,
        "store_array_data_equal_to_fill_value": True, "custom_metadata": None})
    write_json_atomic(os.path.join(params_dir, CHECKPOINT_METADATA_FILE), {
        "item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler."
                         "PyTreeCheckpointHandler",
        "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": None,
        "commit_timestamp_nsecs": None, "custom_metadata": {}})


def open_for_reading(params_dir: str) -> dict[str, ts.TensorStore]:
    """Opens every leaf of an Orbax PyTree checkpoint for slice reads, whichever way Orbax
    stored it (OCDBT or a directory per leaf, zarr v2 or v3): `{leaf name: ts.TensorStore}`."""
    with open(os.path.join(params_dir, METADATA_FILE)) as f:
        meta = json.load(f)
    ocdbt = os.path.exists(os.path.join(params_dir, "manifest.ocdbt"))
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    futures = {}
    for entry in meta["tree_metadata"].values():
        name = leaf_name(tuple(str(k["key"]) for k in entry["key_metadata"]))
        if ocdbt:
            kvstore = {"driver": "ocdbt", "base": f"file://{params_dir}/", "path": name + "/"}
        else:
            kvstore = {"driver": "file", "path": os.path.join(params_dir, name) + "/"}
        futures[name] = ts.open({"driver": driver, "kvstore": kvstore}, open=True)
    return {name: f.result() for name, f in futures.items()}
