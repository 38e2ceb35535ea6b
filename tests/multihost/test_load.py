"""`k2jax.load(path, mesh)` in two processes (2 CPU devices each, mesh expert=4): each reads
about half the checkpoint's bytes (counted by the kernel: `rchar` of /proc/self/io), and the
shards each holds equal the same slices of a one-process load."""

import os

import jax
import numpy as np
import pytest

import k2jax
from k2jax import param_sharding, sharding
from serve.server_cli import random_params
from tests.multihost.harness import Job, python

TIMEOUT = 240


@pytest.fixture(scope="module")
def expert_heavy_checkpoint(tmp_path_factory):
    """tiny with 64 experts, so that the routed experts (split over the processes) are most of
    the bytes; everything else is replicated and read by both."""
    config = k2jax.ModelConfig.preset("tiny").replace(n_routed_experts=64,
                                                      moe_intermediate_size=128, dtype="float32")
    path = tmp_path_factory.mktemp("load") / "ckpt"
    # Saved from a mesh, each expert shard is its own chunk (as a training export or
    # `k2jax convert`, which chunks per expert, store them).
    mesh = sharding.make_mesh("expert=8")
    params = param_sharding.shard_params(random_params(config, seed=4), config, mesh)
    k2jax.save(path, config, params)
    return path


def _stored_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path / "params") for f in files)


def test_each_process_reads_its_own_shards(expert_heavy_checkpoint, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    for processes, devices, out in ((2, 2, two), (1, 4, one)):
        out.mkdir()
        worker = python("-m", "tests.multihost.load_worker", expert_heavy_checkpoint,
                        "expert=4", out)
        with Job(worker, processes, devices, tmp_path / "logs", name=out.name) as job:
            job.wait(TIMEOUT)
    stored = _stored_bytes(expert_heavy_checkpoint)
    results = [dict(np.load(two / f"{p}.npz")) for p in (0, 1)]
    fractions = [int(r.pop("read_bytes")) / stored for r in results]
    alone = int(np.load(one / "0.npz")["read_bytes"]) / stored
    # The experts are ~95% of the bytes: each process reads half of them, the replicated rest
    # and the checkpoint's metadata; one process alone reads it all.
    assert all(0.45 < f < 0.62 for f in fractions) and 0.95 < alone < 1.2, (fractions, alone)
    assert not results[0].keys() & results[1].keys()  # disjoint shards

    _, params = k2jax.load(expert_heavy_checkpoint)
    leaves = {jax.tree_util.keystr(p): np.asarray(x)
              for p, x in jax.tree_util.tree_leaves_with_path(params)}
    held = {}
    for result in results:
        for key, shard in result.items():
            name, index = key.split("|")
            slices = tuple(slice(*map(int, part.split(":"))) for part in index.split(","))
            np.testing.assert_array_equal(shard, leaves[name][slices], err_msg=key)
            held.setdefault(name, 0)
            held[name] += shard.size
    # Between them the processes hold every value of every leaf once (replicas counted once
    # by replica_id 0, which lives on one process).
    assert held == {name: leaf.size for name, leaf in leaves.items()}
