"""Ctrl-C (SIGINT) and SIGTERM at random points of `k2jax train`: the process saves the step it
reached, finishes every checkpoint write and exits with status 130 / 143 and one line on stderr;
no half-written checkpoint (`*.orbax-checkpoint-tmp*`) is left; `--resume` continues from that
step and the run ends with exactly the losses of the uninterrupted run.

A signal may land during start-up or compilation (nothing to save yet), between steps or while
an asynchronous checkpoint is being written (`--checkpoint-every 1` keeps one in flight). Two
trials run by default; the slow test runs twelve (K2JAX_SLOW_TESTS=1).
"""

import os
import random
import re
import signal
import time

import pytest

from tests.train.common import STEPS, finish, losses
from train.interrupt import Interrupted, StopRequests

# (signal, checkpoint_every, seed) of the default trials.
QUICK = [(signal.SIGINT, 1, 0), (signal.SIGTERM, 3, 1)]
SLOW = [(sig, every, seed) for seed in range(12)
        for sig, every in [((signal.SIGINT, signal.SIGTERM)[seed % 2], (1, 2, 5)[seed % 3])]]


def _temporary_dirs(run_dir):
    return sorted(str(p) for p in run_dir.rglob("*orbax-checkpoint-tmp*"))


def _metrics_lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def _signal_at_a_random_point(proc, metrics, rng):
    """Sends nothing until a random number of steps (0: still starting) plus a random delay."""
    after = rng.choice([0, *range(1, STEPS - 4)])
    deadline = time.time() + (rng.uniform(1, 8) if after == 0 else 600)
    while proc.poll() is None and time.time() < deadline and _metrics_lines(metrics) < max(
            after, 1):
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.3))
    assert proc.poll() is None, "the run ended before the signal"


def _trial(runner, k2jax_train, reference, signum, checkpoint_every, seed):
    root, _, start = runner
    out = root / f"signal-{seed}-{signum.name}"
    proc = start(out, "--checkpoint-every", checkpoint_every)
    _signal_at_a_random_point(proc, out / "metrics.jsonl", random.Random(seed))
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"k2jax train: stopped by {signum.name} at "
                                                   "step "), err
    assert _temporary_dirs(out) == []
    stopped_at = int(re.search(r"at step (\d+)", lines[0]).group(1))
    if stopped_at:
        newest = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
        assert newest == stopped_at == max(losses(out)[0])
    finish(k2jax_train("--resume", "--out", out, "--quiet"))
    assert _temporary_dirs(out) == []
    assert losses(out)[0] == reference
    return stopped_at


def test_stop_requests_record_the_first_signal_and_restore_the_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # Python runs handlers between bytecodes of the main thread
        assert stop.received == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in before} == before
    assert [Interrupted(s, 3).exit_code for s in (signal.SIGINT, signal.SIGTERM)] == [130, 143]
    # A signal the parent told us to ignore (a background job's SIGINT) stays ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequests() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert stop.received is None
    finally:
        signal.signal(signal.SIGINT, before[signal.SIGINT])


@pytest.mark.parametrize("signum, checkpoint_every, seed", QUICK,
                         ids=[f"{s.name}-every-{every}" for s, every, _ in QUICK])
def test_a_signal_saves_the_step_and_resume_ends_as_uninterrupted(
        runner, k2jax_train, uninterrupted, signum, checkpoint_every, seed):
    _trial(runner, k2jax_train, losses(uninterrupted[1])[0], signum, checkpoint_every, seed)


@pytest.mark.slow
def test_twelve_signals_at_random_points(runner, k2jax_train, uninterrupted):
    reference = losses(uninterrupted[1])[0]
    for trial in SLOW:
        stopped_at = _trial(runner, k2jax_train, reference, *trial)
        print(f"{trial[0].name} with --checkpoint-every {trial[1]} (seed {trial[2]}): stopped "
              f"at step {stopped_at}, resumed to the uninterrupted losses", flush=True)
