"""The thinking agent's pipeline, stage by stage, each handing the next an artifact on disk:

    corpus + tokenizer   DIR/corpus.jsonl, DIR/tokenizer/tiktoken.model  (examples.agent_tasks)
    train                `k2jax train --preset agent ...`, INT4 QAT on the routed experts or
                         none; exports DIR/NAME (the tokenizer travels with it)
    quantize             a float export's routed experts rounded to INT4 after training (PTQ)
    round trip           `k2jax convert --to hf`, then back to Orbax; every leaf bit-exact
    serve                `k2jax serve --checkpoint ...` on a free loopback port

`benchmarks/agent.py` runs it at full size and compares the three models; the CI test runs it
shortened. Each stage runs the `k2jax` command's own entry point (`cli.command.main`) in a
subprocess, as a user's shell would.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from examples import agent_tasks

PRESET = "agent"
QAT_GROUPS = ("routed_experts",)
SEQ_LEN = 448  # the longest conversation (~410 tokens) fits one row


K2JAX = [sys.executable, "-c", "import sys; from cli.command import main; sys.exit(main())"]


def k2jax(*argv: str, env=None, timeout: float | None = None) -> None:
    """Runs one `k2jax` command as a subprocess (`env`: its environment); raises if it fails,
    with its output."""
    done = subprocess.run(K2JAX + [str(a) for a in argv], env=env, timeout=timeout,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"k2jax {' '.join(map(str, argv))} exited with status "
                           f"{done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")


def prepare(directory: str, count: int, seed: int = 0) -> tuple[str, str]:
    """Writes the training corpus and its tokenizer (`python -m examples.agent_tasks DIR`);
    returns their paths."""
    from k2jax import ModelConfig

    os.makedirs(directory, exist_ok=True)
    corpus = os.path.join(directory, "corpus.jsonl")
    agent_tasks.write_corpus(corpus, count, seed)
    tokenizer = agent_tasks.write_tokenizer(os.path.join(directory, "tokenizer"),
                                            ModelConfig.preset(PRESET).vocab_size)
    return corpus, tokenizer


def train_arguments(corpus: str, tokenizer: str, run_dir: str, export: str, *, qat: bool,
                    steps: int, batch_size: int = 4, seq_len: int = SEQ_LEN,
                    learning_rate: float = 5e-3, warmup_steps: int = 30) -> list[str]:
    """`k2jax train` arguments of one run (float32 compute: the CPU has no fast bf16)."""
    return ["train", "--preset", PRESET, "--data", corpus, "--tokenizer", tokenizer,
            "--out", run_dir, "--export", export, "--steps", str(steps),
            "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--whole-documents",
            "--learning-rate", str(learning_rate), "--warmup-steps", str(warmup_steps),
            "--compute-dtype", "float32", "--qat", ",".join(QAT_GROUPS) if qat else "none",
            "--checkpoint-every", str(steps), "--log-every", "5", "--quiet"]


def quantize(source: str, destination: str, groups=QAT_GROUPS) -> None:
    """Post-training quantization: `source`'s `groups` rounded to INT4 (the export's own
    rounding), saved with its tokenizer as a new checkpoint."""
    import k2jax
    from train import data, qat

    config, params = k2jax.load(source)
    out_config, out_params = qat.export_params(params, config, groups, config.dtype)
    k2jax.save(destination, out_config, out_params, files=data.tokenizer_files(source))


def round_trip(source: str, hub_dir: str, back: str, env=None,
               timeout: float | None = None) -> None:
    """`k2jax convert --to hf source hub_dir` and `k2jax convert hub_dir back`; raises unless
    every leaf of `back` equals `source`'s bit for bit."""
    import jax
    import numpy as np

    import k2jax as model_lib

    k2jax("convert", "--to", "hf", "--no-progress", source, hub_dir, env=env, timeout=timeout)
    k2jax("convert", "--no-progress", hub_dir, back, env=env, timeout=timeout)
    (config_a, params_a), (config_b, params_b) = model_lib.load(source), model_lib.load(back)
    # A checkpoint without K2's modeling code exports as model_type deepseek_v3 (see
    # convert.to_hf); everything else must come back as it was.
    if config_a.replace(model_type=config_b.model_type) != config_b:
        raise AssertionError(f"{back}: config differs from {source}'s")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params_a),
                            jax.tree.leaves(params_b)):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            raise AssertionError(f"{back}: {jax.tree_util.keystr(path)} differs from {source}'s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(checkpoint: str, *, max_batch: int = 8, timeout: float = 300.0, log=None,
            env=None):
    """`k2jax serve --checkpoint CHECKPOINT` in a subprocess; yields its `/v1` base URL once
    `/health` answers, and stops it on exit."""
    port = free_port()
    process = subprocess.Popen(
        K2JAX + ["serve", "--checkpoint", checkpoint, "--port", str(port),
                 "--max-batch", str(max_batch), "--log-level", "warning"],
        stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"k2jax serve --checkpoint {checkpoint} exited with status "
                                   f"{process.returncode}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if json.load(response).get("status") == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"k2jax serve did not answer /health in {timeout:.0f} s")
            time.sleep(0.5)
        yield url + "/v1"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
