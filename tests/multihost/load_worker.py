"""One process of a multi-process `k2jax.load`: reads CHECKPOINT onto the mesh MESH over every
process's devices and writes OUT/<process>.npz: the bytes this process read (`rchar` of
/proc/self/io across the load) and every shard it holds, keyed `leaf|index`."""

import sys

import jax
import numpy as np

import k2jax
from k2jax import sharding


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def main(checkpoint: str, mesh_spec: str, out: str) -> None:
    mesh = sharding.make_mesh(mesh_spec)
    # Imports read many files, none of them the checkpoint's: done before counting.
    import orbax.checkpoint  # noqa: F401
    import tensorstore  # noqa: F401

    import k2jax.api  # noqa: F401  (the model and its kernels)

    before = read_bytes()
    _, params = k2jax.load(checkpoint, mesh)
    jax.block_until_ready(params)
    read = read_bytes() - before
    shards = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        for shard in leaf.addressable_shards:
            if shard.replica_id == 0:
                bounds = (s.indices(n)[:2] for s, n in zip(shard.index, leaf.shape))
                index = ",".join(f"{start}:{stop}" for start, stop in bounds)
                shards[f"{jax.tree_util.keystr(path)}|{index}"] = np.asarray(shard.data)
    np.savez(f"{out}/{jax.process_index()}.npz", read_bytes=read, **shards)


if __name__ == "__main__":
    main(*sys.argv[1:])
