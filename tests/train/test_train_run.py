"""`k2jax train` end to end, in subprocesses (fixtures in conftest.py): the loss falls on a
small fixed corpus; a run killed with SIGKILL and resumed logs exactly the uninterrupted run's
losses; the exported INT4 experts are the run's final master weights quantized; fine-tuning that
export starts at the loss the INT4 model has in a single-device forward."""

import json
import os
import signal
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import k2jax
from k2jax import quant
from tests.train.common import STEPS, fast_jit, finish, losses
from train import data
from train.loss import weighted_loss_sum


def test_loss_falls_on_a_small_corpus(uninterrupted):
    _, out = uninterrupted
    logged, records = losses(out)
    assert sorted(logged) == list(range(1, STEPS + 1))
    first, last = logged[1], np.mean([logged[s] for s in range(STEPS - 2, STEPS + 1)])
    assert first > 5.5 and last < first - 1.5, logged
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
    finish(start(out, "--resume"))
    resumed, records = losses(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert resumed == losses(uninterrupted[1])[0]


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
    rows = data.BatchStreams(data.JsonlCorpus(corpus, data.byte_tokenizer()), 32, seed=0,
                             batch_size=4).next_batch()
    batch = {k: jnp.asarray(v) for k, v in rows.items()}

    def loss(params):
        logits = k2jax.logits(config, params, batch["tokens"], batch["positions"],
                              batch["segment_ids"])
        return weighted_loss_sum(logits, batch["targets"], batch["weights"]) / jnp.sum(
            batch["weights"])

    expected = float(fast_jit(loss)(params))
    finish(proc)
    with open(out / "train_config.json") as f:
        assert json.load(f)["preset"] is None
    np.testing.assert_allclose(losses(out)[0][1], expected, rtol=2e-3)
