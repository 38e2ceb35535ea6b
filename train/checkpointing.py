"""Training checkpoints with Orbax: state, data position, asynchronous, atomic, keep-last-N.

`OUT/checkpoints/<step>/` holds two items: `state` (the step counter, float32 master parameters
and the optimizer state, as sharded arrays) and `data` (every data stream's position and the
seed, JSON, combined from all processes). In a multi-process run every process calls `save`
and `restore`: Orbax writes each process's shards and process 0 the JSON. Orbax writes each checkpoint into a temporary directory and renames it when complete, in
a background thread while training continues; a run killed (SIGKILL) mid-write leaves only a
temporary directory, which is ignored and cleaned up, so the latest complete step is what
`--resume` reads. SIGINT and SIGTERM leave none: the trainer stops between steps, saves, and
`close` waits for every write (`train.interrupt`).
The step itself has no randomness: the data seed and position are the run's whole random state.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class Checkpoints:
    """Saves every `every` steps (and when forced), keeps the newest `keep`."""

    def __init__(self, run_dir: str, every: int, keep: int):
        self.directory = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state, force: bool = False) -> bool:
        """Starts writing `state` and `data_state()` as `step` when due; returns whether it did.

        `data_state` is called only then (on every process: combining the processes' data
        positions is a collective)."""
        if not (force or self.manager.should_save(step)):
            return False
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state())))

    def restore(self, step: int, abstract_state):
        """`(state, data_state)` of `step`, the state placed as `abstract_state`'s shardings.

        Args:
          abstract_state: `ShapeDtypeStruct` tree of the state with `sharding`s set.
        """
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def close(self) -> None:
        """Waits for pending writes, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(state, shardings):
    """`ShapeDtypeStruct`s of `state` (arrays or structs) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
