"""Serving for Kimi K2: generation, output parsers, and the tokenizer / chat template of
`k2jax.text` re-exported.

Names are exported lazily, so `import serve` stays cheap and a light client never loads more
than the module it uses.
"""

import importlib

_EXPORTS = {
    "K2Tokenizer": "k2jax.text.tokenizer",
    "IncrementalDetokenizer": "k2jax.text.tokenizer",
    "ChatPrompt": "k2jax.text.chat_template",
    "apply_chat_template": "k2jax.text.chat_template",
    "render_chat": "k2jax.text.chat_template",
    "generate": "serve.generation",
    "stream": "serve.generation",
    "OutputParser": "serve.parsers",
    "ParsedDelta": "serve.parsers",
    "ParsedMessage": "serve.parsers",
    "parse_output": "serve.parsers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
