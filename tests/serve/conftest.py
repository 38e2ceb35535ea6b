"""Fixtures for the serving tests: a tiny K2-format tokenizer and its `tiktoken.model` on disk."""

import pytest

from serve.testing import tiny_tokenizer, write_tiny_tiktoken_file


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiktoken_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("k2_tokenizer")
    write_tiny_tiktoken_file(directory)
    return directory
