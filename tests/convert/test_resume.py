"""Resumable conversion: a SIGKILLed `k2jax convert` run again ends byte-identical to an
uninterrupted run, and nothing incomplete ever loads; Ctrl-C and SIGTERM stop it with one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from convert.reader import ConversionError
from convert.to_orbax import STATE_DIR, convert_to_orbax
from k2jax.checkpoint import CheckpointError, load
from tests.convert import hub
from tests.convert.conftest import K2
from tests.hf_reference import hub_state_dict, random_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def many_layers_hub(tmp_path_factory):
    """Enough layers and experts (8 x 32) that a conversion can be killed half way."""
    config = K2.replace(num_hidden_layers=8, n_routed_experts=32)
    model = random_hf_model(config, seed=3)
    return hub.write_hub(tmp_path_factory.mktemp("hub") / "many", hub.bf16(
        hub_state_dict(model)), model, shard_bytes=1 << 20, dtype="bfloat16")


def _tree(directory):
    """{relative path: bytes} of every file below `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = fh.read()
    return out


@pytest.fixture(scope="module")
def clean(many_layers_hub, tmp_path_factory):
    """The uninterrupted conversion of `many_layers_hub`."""
    out = str(tmp_path_factory.mktemp("clean") / "ckpt")
    convert_to_orbax(many_layers_hub, out, progress=False)
    return out


def _start(src, dst):
    """`k2jax convert src dst` in a subprocess."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "cli", "convert", src, dst,
                             "--no-progress"], env=env, stderr=subprocess.PIPE)


def _signal_after(proc, dst, after_units, signum):
    """Sends `signum` to `proc` once `after_units` units of `dst` are marked done."""
    done_dir = os.path.join(dst + ".partial", STATE_DIR, "done")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isdir(done_dir) and len(os.listdir(done_dir)) >= after_units:
            proc.send_signal(signum)
            return
        time.sleep(0.001)
    raise AssertionError(f"no {after_units} done units (exit {proc.poll()}): "
                         f"{proc.stderr.read().decode() if proc.poll() is not None else ''}")


def _start_and_kill(src, dst, after_units):
    """Runs `k2jax convert src dst` in a subprocess and SIGKILLs it once `after_units` units
    are marked done. Returns how many were done when it died."""
    proc = _start(src, dst)
    try:
        _signal_after(proc, dst, after_units, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    return len(os.listdir(os.path.join(dst + ".partial", STATE_DIR, "done")))


def test_killed_conversion_resumes_to_identical_checkpoint(many_layers_hub, clean, tmp_path):
    killed = str(tmp_path / "killed")
    units = 1 + 8  # top + layers
    first = _start_and_kill(many_layers_hub, killed, after_units=2)
    assert first < units and not os.path.exists(killed)
    with pytest.raises(CheckpointError, match="not a complete k2jax checkpoint"):
        load(killed + ".partial")
    second = _start_and_kill(many_layers_hub, killed, after_units=first + 3)
    assert first < second < units
    notes = []
    convert_to_orbax(many_layers_hub, killed, progress=False, log=notes.append)
    assert any(f"resuming {killed}.partial: {second} units done" in n for n in notes)
    assert not os.path.exists(killed + ".partial")
    assert _tree(killed) == _tree(clean)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_with_one_line_and_rerun_resumes(many_layers_hub, clean, tmp_path,
                                                      signum):
    out = str(tmp_path / "ckpt")
    proc = _start(many_layers_hub, out)
    try:
        _signal_after(proc, out, 2, signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert err.decode() == "k2jax convert: interrupted; rerun the same command to resume\n"
    assert proc.returncode == 128 + signum
    with pytest.raises(CheckpointError, match=f"{out} does not exist yet: {out}.partial is an "
                       "unfinished `k2jax convert`; run the same command again"):
        load(out)
    notes = []
    convert_to_orbax(many_layers_hub, out, progress=False, log=notes.append)
    assert any(n.startswith(f"resuming {out}.partial: ") for n in notes)
    assert _tree(out) == _tree(clean)


def test_interrupted_finish_is_completed(k2_hub, tmp_path):
    out = str(tmp_path / "ckpt")
    convert_to_orbax(k2_hub.path, out, progress=False)
    reference = _tree(out)
    # Killed after config.json was written but before the rename.
    os.rename(out, out + ".partial")
    os.makedirs(os.path.join(out + ".partial", STATE_DIR, "done"))
    convert_to_orbax(k2_hub.path, out, progress=False)
    assert _tree(out) == reference and not os.path.exists(out + ".partial")
    # Killed after the rename, before the state directory was removed.
    os.makedirs(os.path.join(out, STATE_DIR, "done"))
    convert_to_orbax(k2_hub.path, out, progress=False)
    assert _tree(out) == reference


def test_existing_output_of_another_conversion_is_refused(k2_hub, tmp_path):
    out = str(tmp_path / "ckpt")
    convert_to_orbax(k2_hub.path, out, progress=False)
    with pytest.raises(ConversionError, match="already exists and is not this conversion"):
        convert_to_orbax(k2_hub.path, out, dtype="float32", progress=False)


def test_partial_output_of_another_conversion_is_refused(k2_hub, tmp_path):
    out = str(tmp_path / "ckpt")
    os.makedirs(os.path.join(out + ".partial", STATE_DIR))
    with pytest.raises(ConversionError, match="not a k2jax conversion in progress"):
        convert_to_orbax(k2_hub.path, out, progress=False)
    with open(os.path.join(out + ".partial", STATE_DIR, "plan.json"), "w") as f:
        json.dump({"source": "elsewhere"}, f)
    with pytest.raises(ConversionError, match="started from a different source"):
        convert_to_orbax(k2_hub.path, out, progress=False)
    shutil.rmtree(out + ".partial")


def test_checkpoint_without_config_is_not_loadable(k2_hub, tmp_path):
    out = tmp_path / "ckpt"
    convert_to_orbax(k2_hub.path, out, progress=False)
    os.remove(out / "config.json")
    with pytest.raises(CheckpointError, match="not a complete k2jax checkpoint"):
        load(out)


def test_split_over_two_workers_is_byte_identical(many_layers_hub, clean, tmp_path):
    """`--worker 0/2` and `--worker 1/2` side by side; the second also killed once and rerun."""
    dst = str(tmp_path / "split")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")

    def worker(i):
        return subprocess.Popen([sys.executable, "-m", "cli", "convert", many_layers_hub,
                                 dst, "--no-progress", "--worker", f"{i}/2"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first, second = worker(0), worker(1)
    try:
        _signal_after(second, dst, 2, signal.SIGKILL)
        second.wait(timeout=60)
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
        assert not os.path.exists(dst)  # worker 1's units are not all done
        assert "worker 0/2 done" in out
        again = worker(1)
        out, err = again.communicate(timeout=300)
        assert again.returncode == 0, err
        assert "wrote k2jax checkpoint" in out
    finally:
        for proc in (first, second):
            proc.kill()
    assert _tree(dst) == _tree(clean)
    assert sorted(os.listdir(tmp_path)) == ["split"]  # no partial directory or lock left
    with pytest.raises(ConversionError, match="worker 2/2"):
        convert_to_orbax(many_layers_hub, str(tmp_path / "x"), worker=(2, 2))
