"""HF hub safetensors <-> k2jax checkpoints (Orbax), streaming.

`convert_to_orbax(hf_dir, out_dir)` reads a hub model directory (bf16/f32, FP8 block-quantized,
or compressed-tensors INT4) layer by layer into a k2jax checkpoint; `convert_to_hf(ckpt, out_dir)`
writes one back as a hub directory. `k2jax convert` is their command line (`convert.cli`).
"""

from convert.reader import ConversionError
from convert.to_hf import convert_to_hf
from convert.to_orbax import convert_to_orbax

__all__ = ["ConversionError", "convert_to_hf", "convert_to_orbax"]
