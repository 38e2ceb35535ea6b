"""The README's resume, as a user types it: a run with --export, then `--resume --out --steps`
with a larger --steps. The resumed run takes every option from the first, leaves the first
run's finished export alone (saying so in one line), keeps the first run's learning-rate
schedule, and logs what one uninterrupted run with that schedule (--decay-steps) logs; a later
resume with --export writes the final model there without compiling a step."""

import json
import os

import numpy as np

import k2jax
from tests.train.common import STEPS, finish, losses

HALF = STEPS // 2
WARMUP = 2  # the runner's --warmup-steps: lr[WARMUP] (step 3) is the first at the peak


def _records(run_dir):
    return {r["step"]: r for r in losses(run_dir)[1]}


def test_readme_resume_continues_the_run_and_its_schedule(runner, k2jax_train):
    root, _, start = runner
    out, first_export, later_export = root / "readme", root / "readme-int4", root / "readme-2"
    reference = start(root / "reference", "--decay-steps", HALF)  # runs beside the first run
    finish(start(out, "--export", first_export, steps=HALF))
    first = _records(out)
    exported_at = os.stat(first_export / "config.json").st_mtime_ns

    _, err = finish(k2jax_train("--resume", "--out", out, "--steps", STEPS, "--quiet"))
    assert err.splitlines() == [f"k2jax train: not exporting: {first_export} already holds an "
                                f"earlier export of this run; pass --export PATH to export "
                                f"step {STEPS}"]
    assert os.stat(first_export / "config.json").st_mtime_ns == exported_at
    with open(out / "train_config.json") as f:
        saved = json.load(f)
    assert (saved["steps"], saved["decay_steps"], saved["learning_rate"]) == (STEPS, HALF, 3e-3)

    resumed = _records(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert all(resumed[s] == first[s] for s in first)
    lr = [resumed[s]["learning_rate"] for s in range(1, STEPS + 1)]
    # Warmup, cosine decay to the first run's end, then the final rate: never a jump back up.
    assert lr[WARMUP] == max(lr) and np.all(np.diff(lr[WARMUP:]) <= 0), lr
    np.testing.assert_allclose(lr[HALF:], 3e-4, rtol=1e-6)
    finish(reference)
    expected = _records(root / "reference")
    for s in range(1, STEPS + 1):
        assert resumed[s]["loss"] == expected[s]["loss"], s
        assert resumed[s]["learning_rate"] == expected[s]["learning_rate"], s

    out_text, _ = finish(k2jax_train("--resume", "--out", out, "--export", later_export))
    assert f"exported {later_export}" in out_text
    _, params = k2jax.load(later_export)
    _, earlier = k2jax.load(first_export)
    path = ("moe_layers", "mlp", "experts", "up_proj", "kernel")
    late, early = params, earlier
    for key in path:
        late, early = late[key], early[key]
    assert not np.array_equal(np.asarray(late.scale), np.asarray(early.scale))
