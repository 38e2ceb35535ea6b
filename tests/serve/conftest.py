"""Fixtures shared by the server tests that run the real engine."""

import pytest

import k2jax
from serve.server_cli import preset_for_tokenizer, random_params


@pytest.fixture(scope="module")
def tiny():
    """`(config, params, tokenizer)`: the `tiny` preset with random weights and the test
    tokenizer, sized to each other."""
    from k2jax.text.testing import tiny_tokenizer

    config = k2jax.ModelConfig.preset("tiny")
    tokenizer = tiny_tokenizer(config.vocab_size)
    config = preset_for_tokenizer(config, tokenizer)
    return config, random_params(config), tokenizer
