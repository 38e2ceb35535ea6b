"""Pallas kernels for k2jax, each beside the pure-JAX reference that is also its CPU fallback.

One folder per op, each exposing one entry point with `impl="auto" | "reference" | "pallas"`:
`topk_routing.route`, `int4_matmul.int4_matmul`, `grouped_int4_matmul.grouped_int4_matmul`.
In each folder: `api.py` (the entry point), `reference.py` (pure JAX, differentiable),
`pallas_triton.py` (GPU) and `pallas_tpu.py` (Mosaic TPU), each kernel with a frozen block-size
`Config` and a default chosen from the shapes. `common.py` holds what they share.
"""
