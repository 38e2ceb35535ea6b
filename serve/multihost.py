"""Serving on several processes (a pod slice, or hosts of a GPU cluster): process 0 runs the
HTTP server and the scheduler; every process holds its shards of the weights and the page pool
and runs the same jitted steps.

Before each device call, process 0 broadcasts it (`StepBroadcast.send`): what to run and its
host inputs (tokens, positions, page tables, sampling rows, steering), as a fixed-size JSON
header of names, dtypes and shapes, then the arrays. The other processes wait in `follow`,
receive each call and make it on their own `Engine` (built with the same arguments), so every
process enters every collective of every step. The broadcasts are JAX collectives
(`multihost_utils.broadcast_one_to_all`); nothing but JAX's own runtime connects the hosts.

A follower that dies breaks the next collective: process 0's step raises, the engine loop
fails every request in flight, `/health` answers 503 and `k2jax serve` exits non-zero.
"""

from __future__ import annotations

import json

import jax
import numpy as np

HEADER_BYTES = 1 << 16
STOP = "stop"


def _broadcast(tree):
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)


class StepBroadcast:
    """Process 0's side (`send`) and the followers' (`receive`) of the step stream."""

    def send(self, op: str, arrays=()) -> None:
        arrays = [None if a is None else np.ascontiguousarray(a) for a in arrays]
        header = json.dumps({"op": op, "arrays": [
            None if a is None else [a.dtype.str, list(a.shape)] for a in arrays]}).encode()
        if len(header) > HEADER_BYTES - 4:
            raise ValueError(f"step header of {len(header)} bytes exceeds {HEADER_BYTES}")
        buffer = np.zeros(HEADER_BYTES, np.uint8)
        buffer[:4] = np.frombuffer(np.uint32(len(header)).tobytes(), np.uint8)
        buffer[4:4 + len(header)] = np.frombuffer(header, np.uint8)
        _broadcast(buffer)
        present = [a for a in arrays if a is not None]
        if present:
            _broadcast(present)

    def receive(self) -> tuple[str, list]:
        buffer = np.asarray(_broadcast(np.zeros(HEADER_BYTES, np.uint8)))
        length = int(np.frombuffer(buffer[:4].tobytes(), np.uint32)[0])
        header = json.loads(buffer[4:4 + length].tobytes())
        specs = header["arrays"]
        zeros = [np.zeros(shape, np.dtype(dtype)) for dtype, shape in filter(None, specs)]
        received = iter([np.asarray(a) for a in _broadcast(zeros)] if zeros else [])
        return header["op"], [None if spec is None else next(received) for spec in specs]


def is_leader() -> bool:
    return jax.process_index() == 0


def follow(engine) -> None:
    """A follower process's loop: runs each call process 0 broadcasts on `engine` until
    process 0 sends `stop` (or a collective fails, which raises)."""
    channel = StepBroadcast()
    while True:
        op, arrays = channel.receive()
        if op == STOP:
            return
        engine.execute(op, arrays)
