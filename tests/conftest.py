"""Test setup: 8 forced host devices (for sharding tests) before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """A tiny K2-format tokenizer (byte-level BPE + the K2 special-token layout)."""
    from k2jax.text.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiktoken_dir(tmp_path_factory):
    """A directory holding a tiny `tiktoken.model` in K2's format."""
    from k2jax.text.testing import write_tiny_tiktoken_file

    directory = tmp_path_factory.mktemp("k2_tokenizer")
    write_tiny_tiktoken_file(directory)
    return directory
