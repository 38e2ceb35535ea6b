"""Helpers of the training tests: quick-to-compile jit and small random models.

XLA's CPU backend spends most of a tiny model's compile time in LLVM optimisation; tests
compile with it off (`FAST_COMPILE`), which changes speed, not results within one test.
"""

import functools

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
