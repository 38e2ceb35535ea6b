"""Kimi K2 text: the tiktoken tokenizer, special tokens and the K2 Thinking chat template.

Shared by training (chat data with assistant loss masks) and serving; pure Python, no JAX.
"""

from __future__ import annotations

import os

from k2jax.text.tokenizer import TIKTOKEN_FILE_NAME, K2Tokenizer

__all__ = ["K2Tokenizer", "load_tokenizer"]


def load_tokenizer(path: str | os.PathLike) -> K2Tokenizer:
    """The K2 tokenizer of a `tiktoken.model` file, or of a directory that holds one: an HF
    checkpoint, or a k2jax checkpoint converted from one (conversion carries the file along).

        tokenizer = k2jax.text.load_tokenizer("ckpt/kimi-k2-thinking")
        serve.generate(model, "Hello", tokenizer=tokenizer)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        file = os.path.join(path, TIKTOKEN_FILE_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {TIKTOKEN_FILE_NAME} in {path}: give the tokenizer "
                                    "file or the directory of the original HF checkpoint")
        path = file
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer file or directory at {path}")
    return K2Tokenizer.from_file(path)
