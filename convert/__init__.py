"""HF hub safetensors <-> k2jax checkpoints (Orbax), streaming.

`convert_to_orbax(hf_dir, out_dir)` reads a hub model directory (bf16/f32, FP8 block-quantized,
or compressed-tensors INT4) layer by layer into a k2jax checkpoint; `convert_to_hf(ckpt, out_dir)`
writes one back as a hub directory. `k2jax convert` is their command line (`convert.cli`).

Names are exported lazily, so `k2jax convert` loads JAX only once its signal handlers are in
place: a Ctrl-C at any point prints one line, never a traceback from an import.
"""

import importlib

_EXPORTS = {
    "ConversionError": "convert.reader",
    "convert_to_hf": "convert.to_hf",
    "convert_to_orbax": "convert.to_orbax",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'convert' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
