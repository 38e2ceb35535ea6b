"""What the kernels share: choosing an implementation, gradients, tiles, INT4 dequantization.

`resolve(impl, platform, interpret)` turns an entry point's switches into "reference",
"triton" or "tpu"; `with_reference_vjp` gives a kernel its reference's gradient; two helpers
pick block sizes that divide a dimension. `dequantize` is the one definition of
`values * scale`, used by the XLA references on whole weights and by both Pallas backends on
`[bk, bn]` tiles.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference", "pallas")
_PALLAS_BY_PLATFORM = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "tpu"}


def resolve(impl: str, platform: str | None, interpret: bool) -> str:
    """Picks the implementation an entry point runs: "reference", "triton" or "tpu".

    Args:
      impl: "auto" (Pallas on GPU/TPU, the reference on CPU), "reference" or "pallas".
      platform: the Pallas backend's platform, "gpu" or "tpu"; defaults to JAX's default backend.
        With `interpret`, either kernel runs on CPU, so tests name the one they check.
      interpret: run the Pallas kernel in interpret mode (any host).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    platform = platform or jax.default_backend()
    pallas = _PALLAS_BY_PLATFORM.get(platform)
    if impl == "reference" or (impl == "auto" and pallas is None and not interpret):
        return "reference"
    if pallas is None:
        if interpret:
            raise ValueError("interpret=True on CPU needs platform='gpu' or 'tpu' to pick a kernel")
        raise ValueError(f"impl='pallas' has no kernel for platform {platform!r}; "
                         "use impl='auto' or 'reference', or interpret=True with a platform")
    return pallas


def with_reference_vjp(kernel: Callable, reference: Callable) -> Callable:
    """`kernel(*arrays)` whose gradient is `reference`'s, for kernels that have no autodiff.

    The backward pass differentiates the XLA reference (same inputs, same results) with
    respect to the floating-point inputs; integer inputs (int4 values, group sizes) get none.
    """

    @jax.custom_vjp
    def call(*args):
        return kernel(*args)

    def fwd(*args):
        return kernel(*args), args

    def bwd(args, cotangent):
        is_float = [jnp.issubdtype(a.dtype, jnp.floating) for a in args]

        def of_floats(*floats):
            it = iter(floats)
            return reference(*(next(it) if f else a for a, f in zip(args, is_float)))

        _, vjp = jax.vjp(of_floats, *(a for a, f in zip(args, is_float) if f))
        grads = iter(vjp(cotangent))
        return tuple(next(grads) if f else None for f in is_float)

    call.defvjp(fwd, bwd)
    return call


def varying_like(init, *operands):
    """`init` (a pytree) marked as varying over the mesh axes any operand varies over: inside
    `shard_map` a loop carry started from constants must keep the type the body gives it."""
    axes = set()
    for leaf in jax.tree.leaves(operands):
        axes |= set(jax.typeof(leaf).manual_axis_type.varying)
    if not axes:
        return init
    return jax.tree.map(lambda x: jax.lax.pcast(x, tuple(sorted(axes)), to="varying"), init)


def largest_pow2_divisor(dim: int, cap: int) -> int:
    """The largest power of two <= cap dividing dim (Triton blocks are powers of two)."""
    size = 1
    while size * 2 <= cap and dim % (size * 2) == 0:
        size *= 2
    return size


def fitting_tile(dim: int, preferred: int, align: int) -> int:
    """The largest multiple of `align` <= `preferred` dividing `dim`; `dim` itself if none
    (a TPU block dimension is a multiple of its tiling or the whole dimension)."""
    for size in range(min(preferred, dim) // align * align, 0, -align):
        if dim % size == 0:
            return size
    return dim


def int4_dims(x_mk: jax.Array, values_kn: jax.Array, scale_gn: jax.Array
              ) -> tuple[int, int, int, int]:
    """`(M, K, N, group)` of `x [M, K]` times INT4 `values [..., K, N] * scale [..., K/g, N]`:
    the argument handling every INT4 kernel wrapper starts with."""
    m, k = x_mk.shape
    *_, k_values, n = values_kn.shape
    groups = scale_gn.shape[-2]
    if k_values != k or k % groups or scale_gn.shape[-1] != n:
        raise ValueError(f"x {tuple(x_mk.shape)}, values {tuple(values_kn.shape)} and scale "
                         f"{tuple(scale_gn.shape)} do not form x [M, K] @ [K, N], scale [K/g, N]")
    return m, k, n, k // groups


def check_tiles(config, k: int, n: int, group: int, k_splits: int = 1) -> None:
    """Refuses block sizes that do not tile K (in `k_splits` parts) and N, or split a group."""
    if k % (config.block_k * k_splits) or config.block_k % group or n % config.block_n:
        raise ValueError(f"config {config} does not tile K={k}, N={n} with group {group}")


def dequantize(values_kn: jax.Array, scale_gn: jax.Array, dtype) -> jax.Array:
    """`values int4 [..., K, N] * scale [..., K/g, N]` per group of g rows -> `[..., K, N]`.

    The product is formed in float32, where an int4 value times a bf16 scale is exact, so the
    one rounding to `dtype` is the same whether XLA runs it on a whole weight or a kernel on a
    `[bk, bn]` tile in registers / VMEM.
    """
    *lead, k, n = values_kn.shape
    groups = scale_gn.shape[-2]
    v = values_kn.astype(jnp.float32).reshape(*lead, groups, k // groups, n)
    w = v * scale_gn.astype(jnp.float32)[..., None, :]
    return w.reshape(*lead, k, n).astype(dtype)
