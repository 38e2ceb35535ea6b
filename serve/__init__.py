"""Serving for Kimi K2: tokenizer, chat template and output parsers (pure Python, no JAX).

Names are exported lazily, so `import serve` stays cheap and a light client never loads more
than the module it uses.
"""

import importlib

_EXPORTS = {
    "K2Tokenizer": "serve.tokenizer",
    "IncrementalDetokenizer": "serve.tokenizer",
    "ChatPrompt": "serve.chat_template",
    "apply_chat_template": "serve.chat_template",
    "render_chat": "serve.chat_template",
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
