"""Several local processes of one JAX program, as a pod runs them: `jax.distributed` over
127.0.0.1 (the coordinator on a free port), each process with its own forced CPU devices and
gloo collectives (`k2jax.sharding.initialize_distributed` reads `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`).

`Job` starts the processes in their own process groups, writes each one's output to a log file,
and always ends them: `wait` has a hard deadline after which every process is killed, and the
error it raises carries every process's log tail, so a hang or a crash in one host is reported,
never waited on forever.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices: int,
                extra: dict | None = None) -> dict:
    """The environment of one process of the job (`extra`'s XLA_FLAGS are added to ours)."""
    extra = dict(extra or {})
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", "") + " "
                                 + extra.pop("XLA_FLAGS", "")).split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
           "PYTHONUNBUFFERED": "1", **extra}
    if num_processes > 1:
        env |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": str(num_processes), "JAX_PROCESS_ID": str(process_id)}
    return env


class JobFailed(AssertionError):
    pass


class Job:
    """`num_processes` processes running `argv` (a list, or a function of the process id),
    `devices` CPU devices each. Use as a context manager: leaving it kills what still runs."""

    def __init__(self, argv, num_processes: int, devices: int, log_dir, *, env=None,
                 name: str = "job"):
        self.num_processes, self.log_dir = num_processes, Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.logs = [self.log_dir / f"{name}.{i}.log" for i in range(num_processes)]
        self.procs = []
        for i in range(num_processes):
            args = argv(i) if callable(argv) else argv
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(
                    [str(a) for a in args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                    env=process_env(i, num_processes, port, devices, env),
                    start_new_session=True))

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()

    def kill(self, process_id: int, signum: int = signal.SIGKILL) -> None:
        proc = self.procs[process_id]
        if proc.poll() is None:
            os.killpg(proc.pid, signum)

    def kill_all(self) -> None:
        for i in range(self.num_processes):
            self.kill(i)
        for proc in self.procs:
            proc.wait()

    def log_tails(self, chars: int = 2500) -> str:
        return "\n".join(f"---- process {i} (exit {p.poll()}) ----\n"
                         f"{self.logs[i].read_text(errors='replace')[-chars:]}"
                         for i, p in enumerate(self.procs))

    def wait(self, timeout: float, *, expect_success: bool = True) -> list[int]:
        """Exit codes once every process ended; past `timeout` seconds, or as soon as one fails
        (its peers would block in a collective), every process is killed and `JobFailed`."""
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            failed = any(c not in (None, 0) for c in codes)
            if failed or time.monotonic() > deadline:
                self.kill_all()
                why = "a process failed" if failed else f"timed out after {timeout:.0f} s"
                raise JobFailed(f"{why}\n{self.log_tails()}")
            time.sleep(0.1)
        if expect_success and any(codes):
            raise JobFailed(f"exit codes {codes}\n{self.log_tails()}")
        return codes

    def wait_for(self, condition, timeout: float) -> None:
        """Polls `condition()` while every process runs; `JobFailed` if one ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.kill_all()
                raise JobFailed(f"condition not reached\n{self.log_tails()}")
            time.sleep(0.05)


def python(*args) -> list[str]:
    return [sys.executable, *map(str, args)]
