"""Pallas kernels for k2jax, each beside the pure-JAX reference that is also its CPU fallback.

One folder per op, each exposing one entry point with `impl="auto" | "reference" | "pallas"`
(and "tiled" for the grouped matmul): `topk_routing.route`, `int4_matmul.int4_matmul`,
`grouped_matmul.grouped_matmul` (float or INT4 weights; `expert_swiglu` runs three of them),
`attention`. In each folder: `api.py` (the entry point, which alone picks the implementation),
`reference.py` (pure JAX, differentiable), `pallas_triton.py` (GPU) and `pallas_tpu.py` (Mosaic
TPU), each kernel with a frozen block-size `Config` and a default chosen from the shapes;
`grouped_matmul/tiled.py` is the XLA:CPU tile loop. `quantized.py` defines the INT4
`QuantizedWeight` the ops take; `common.py` holds what the kernels share.
"""
