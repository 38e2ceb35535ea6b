"""Ordered, bounded parallel map: the conversions' read-transform stage on a thread pool.

numpy releases the GIL in file reads, shifts and copies, and tensorstore in its reads, so a few
threads keep several tensors in flight while results are still consumed in order (which keeps
shard files and progress deterministic) and memory stays bounded by `window` results.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Threads that read and transform tensors; tensorstore compresses and writes on its own pool.
WORKERS = min(16, os.cpu_count() or 1)


def ordered_map(pool: concurrent.futures.Executor, fn: Callable[[T], R], items: Iterable[T],
                window: int = 2 * WORKERS) -> Iterator[R]:
    """`map(fn, items)` on `pool`, yielding in order, with at most `window` calls pending."""
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # A consumer that stopped early (an error, Ctrl-C) wants no more: the pool's shutdown
        # then waits only for the calls already running.
        for future in pending:
            future.cancel()


def thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(WORKERS)
