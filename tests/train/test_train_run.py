"""`k2jax train` end to end, in subprocesses on two CPU devices (the default mesh, fsdp=2, splits
parameters, optimizer state and batch, and runs the MoE expert-parallel): the loss falls on a
small fixed corpus; a run killed with SIGKILL and resumed logs exactly the uninterrupted run's
losses; the exported INT4 experts are the run's final master weights quantized; fine-tuning that
export starts at the loss the INT4 model has in a single-device forward."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import k2jax
from k2jax import quant
from tests.train.common import fast_jit
from train import data
from train.forward import forward
from train.loss import weighted_loss_sum

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 16
WORDS = ("the cat sat on the mat . a dog ran to the red ball and the bird sang in the tall "
         "green tree while the sun set over the quiet hill").split()


def _corpus(path):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(48):
            start = int(rng.integers(0, len(WORDS) - 12))
            f.write(json.dumps({"text": " ".join(WORDS[start:start + 12])}) + "\n")
    return path


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """`(args, out) -> Popen` of `k2jax train` sharing one corpus and compilation cache."""
    root = tmp_path_factory.mktemp("train_run")
    corpus = _corpus(root / "corpus.jsonl")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(root / "jit"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           # Two devices, and no LLVM optimisation: a tiny model compiles in a fraction of the time.
           "XLA_FLAGS": "--xla_backend_optimization_level=0 "
                        "--xla_force_host_platform_device_count=2"}

    def start(out, *extra, model=("--preset", "tiny")):
        args = [sys.executable, "-m", "k2jax.cli", "train", *model, "--data",
                str(corpus), "--steps", str(STEPS), "--seq-len", "32", "--batch-size", "4",
                "--learning-rate", "3e-3", "--warmup-steps", "2", "--checkpoint-every", "4",
                "--qat", "routed_experts", "--out", str(out), "--quiet", *extra]
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    return root, corpus, start


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


def _losses(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records}, records


@pytest.fixture(scope="module")
def uninterrupted(runner):
    root, _, start = runner
    out = root / "full"
    _finish(start(out, "--export", str(root / "exported")))
    return root, out


def test_loss_falls_on_a_small_corpus(uninterrupted):
    _, out = uninterrupted
    losses, records = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = losses[1], np.mean([losses[s] for s in range(STEPS - 2, STEPS + 1)])
    assert first > 5.5 and last < first - 1.5, losses
    assert len(records[-1]["expert_load"]) == 2 and records[-1]["tokens_per_second"] > 0
    # checkpoints every 4 steps, the newest 3 kept
    assert sorted(int(d) for d in os.listdir(out / "checkpoints")) == [8, 12, 16]


def test_killed_run_resumes_with_identical_losses(runner, uninterrupted):
    root, _, start = runner
    out = root / "killed"
    proc = start(out)
    metrics, deadline = out / "metrics.jsonl", time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(metrics.read_text().splitlines())
    latest = max(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit())
    assert latest < killed_at < STEPS
    _finish(start(out, "--resume"))
    resumed, records = _losses(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert resumed == _losses(uninterrupted[1])[0]


def test_export_holds_the_final_master_weights_quantized(uninterrupted):
    root, out = uninterrupted
    config, params = k2jax.load(root / "exported")
    assert config.quantized_linears == ("routed_experts",)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(out / "checkpoints" / str(STEPS) / "state")
    master = state["params"]["moe_layers"]["mlp"]["experts"]
    for name in ("gate_proj", "up_proj", "down_proj"):
        want = quant.quantize(jnp.asarray(master[name]["kernel"]), config.quant_group_size)
        got = params["moe_layers"]["mlp"]["experts"][name]["kernel"]
        assert isinstance(got, quant.QuantizedWeight)
        np.testing.assert_array_equal(np.asarray(got.values.astype(jnp.int8)),
                                      np.asarray(want.values.astype(jnp.int8)))
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))
    attention = params["moe_layers"]["self_attn"]["o_proj"]["kernel"]
    assert attention.dtype == jnp.bfloat16


def test_finetune_from_the_int4_checkpoint_starts_at_its_loss(runner, uninterrupted):
    root, corpus, start = runner
    out = root / "finetune"
    proc = start(out, "--steps", "2", "--tokenizer", "bytes",
                 model=("--checkpoint", str(root / "exported")))
    config, params = k2jax.load(root / "exported")
    rows = data.Packer(data.JsonlCorpus(corpus, data.byte_tokenizer()), 32, seed=0).rows(4)
    batch = {k: jnp.asarray(v) for k, v in rows.items()}

    def loss(params):
        out = forward(config, params, batch)
        return weighted_loss_sum(out.logits, batch["targets"], batch["weights"]) / jnp.sum(
            batch["weights"])

    expected = float(fast_jit(loss)(params))
    _finish(proc)
    with open(out / "train_config.json") as f:
        assert json.load(f)["preset"] is None
    np.testing.assert_allclose(_losses(out)[0][1], expected, rtol=2e-3)
