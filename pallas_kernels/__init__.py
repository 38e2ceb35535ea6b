"""Pallas kernels for k2jax, each beside the pure-JAX reference that is also its CPU fallback.

One folder per op, each exposing one entry point with `impl="auto" | "reference" | "pallas"`:
`topk_routing.route`, `int4_matmul.int4_matmul`, `grouped_int4_matmul.grouped_int4_matmul`.
"""
