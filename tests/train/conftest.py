"""Fixtures of the end-to-end training tests: `k2jax train` in subprocesses on two CPU devices
(the default mesh, fsdp=2, splits parameters, optimizer state and batch, and runs the MoE
expert-parallel), one small fixed corpus and one compilation cache for the whole session, and
the uninterrupted reference run that resumed and interrupted runs are compared with.

Tests marked `slow` (many interrupted runs) run only with K2JAX_SLOW_TESTS=1.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.train.common import STEPS, finish

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ("the cat sat on the mat . a dog ran to the red ball and the bird sang in the tall "
         "green tree while the sun set over the quiet hill").split()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: run only with K2JAX_SLOW_TESTS=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("K2JAX_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set K2JAX_SLOW_TESTS=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _corpus(path):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(48):
            start = int(rng.integers(0, len(WORDS) - 12))
            f.write(json.dumps({"text": " ".join(WORDS[start:start + 12])}) + "\n")
    return path


@pytest.fixture(scope="session")
def k2jax_train(tmp_path_factory):
    """`(*args) -> Popen` of `k2jax train ARGS`, output piped, one compilation cache."""
    cache = tmp_path_factory.mktemp("jit")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           # Two devices, and no LLVM optimisation: a tiny model compiles in a fraction of the time.
           "XLA_FLAGS": "--xla_backend_optimization_level=0 "
                        "--xla_force_host_platform_device_count=2"}

    def launch(*args):
        return subprocess.Popen([sys.executable, "-m", "cli", "train", *map(str, args)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    return launch


@pytest.fixture(scope="session")
def runner(tmp_path_factory, k2jax_train):
    """`(root, corpus, start)`: `start(out, *extra, model=..., steps=...) -> Popen` of a run on
    the corpus (later options in `extra` override the defaults)."""
    root = tmp_path_factory.mktemp("train_run")
    corpus = _corpus(root / "corpus.jsonl")

    def start(out, *extra, model=("--preset", "tiny"), steps=STEPS):
        return k2jax_train(*model, "--data", corpus, "--steps", steps, "--seq-len", 32,
                           "--batch-size", 4, "--learning-rate", "3e-3", "--warmup-steps", 2,
                           "--checkpoint-every", 4, "--qat", "routed_experts", "--out", out,
                           "--quiet", *extra)

    return root, corpus, start


@pytest.fixture(scope="session")
def uninterrupted(runner):
    """`(root, out)` of a run straight to `STEPS`, exported to `root / "exported"`."""
    root, _, start = runner
    out = root / "full"
    finish(start(out, "--export", str(root / "exported")))
    return root, out
