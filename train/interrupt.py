"""SIGINT and SIGTERM as requests to stop at the next step boundary.

Python's default turns Ctrl-C into a `KeyboardInterrupt` wherever the main thread happens to be,
which can be in the middle of handing a checkpoint to Orbax's writer thread; the process then
exits with that write unfinished (a `*.orbax-checkpoint-tmp*` directory) and tracebacks from
both threads. `StopRequests` records the signal instead, and the training loop asks `received`
between steps, saves the current step, waits for every write and stops (`Interrupted`).
A signal the parent process told us to ignore (a background job's SIGINT) stays ignored.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped on a signal at `step`, which has a complete checkpoint (unless 0);
    the run directory holds the run's config either way, so `--resume` continues it."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process killed by it (130, 143)."""
        return 128 + self.signum


class StopRequests:
    """Context manager: while active, SIGINT/SIGTERM set `received` instead of interrupting.

    Outside the main thread (where Python cannot install handlers) it records nothing and the
    signals keep their handlers.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _record(self, signum, frame):
        self.received = self.received or signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
