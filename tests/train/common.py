"""Helpers of the training tests: quick-to-compile jit, small random models, and reading the
results of `k2jax train` subprocesses.

XLA's CPU backend spends most of a tiny model's compile time in LLVM optimisation; tests
compile with it off (`FAST_COMPILE`), which changes speed, not results within one test.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp

import k2jax
from k2jax.model import Transformer
from train import qat

FAST_COMPILE = {"xla_backend_optimization_level": 0}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)

# tiny with two layers (one dense, one MoE): every feature, half the compile time.
CONFIG = k2jax.ModelConfig.preset("tiny").replace(num_hidden_layers=2)


def random_master(config, seed: int = 0):
    """float32 master weights of `config` (stored unquantized), from the model's initialisers."""
    config = config.replace(quantized_linears=())
    init = fast_jit(lambda key: nn.unbox(Transformer(config).init(
        key, jnp.zeros((1, 1), jnp.int32))["params"]))
    return qat.master_params(init(jax.random.key(seed)))


def random_tokens(config, shape, seed: int = 1):
    return jax.random.randint(jax.random.key(seed), shape, 0, config.vocab_size)


# Steps of the end-to-end runs (see conftest.py).
STEPS = 16


def finish(proc, timeout=600):
    """Waits for a `k2jax train` subprocess; asserts it succeeded; returns `(stdout, stderr)`."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (out + err)[-3000:]
    return out, err


def losses(run_dir):
    """`({step: loss}, records)` of a run's metrics.jsonl."""
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records}, records
