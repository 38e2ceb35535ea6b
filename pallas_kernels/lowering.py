"""Lowering a kernel for a real accelerator on any host, with `jax.export`.

`export(fn, args, "cuda")` runs the Triton lowering and `export(fn, args, "tpu")` the Mosaic
lowering, which reject what the hardware would (block shapes, unsupported ops, int4 layouts),
on a CPU-only machine. The tests and `benchmarks.device_check` use it so the kernels cannot rot
where no accelerator is at hand.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import AbstractDevice, AbstractMesh

PLATFORMS = ("cuda", "tpu")
KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
# Kernels that ask for chip information find it on this abstract device.
_TPU_MESH = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
    device_kind="TPU v5 lite", num_cores=1, platform="tpu"))


def kernel_platform(platform: str) -> str:
    """The `platform=` an entry point takes for an export platform: "gpu" or "tpu"."""
    return "gpu" if platform == "cuda" else "tpu"


def export(fn: Callable, args, platform: str) -> jax.export.Exported:
    """`fn(*args)` (args may be `ShapeDtypeStruct`s) exported for `platform` ("cuda"/"tpu")."""
    if platform == "cuda":
        return jax.export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(KERNEL_CALL["cuda"])])(
            *args)
    with jax.sharding.use_abstract_mesh(_TPU_MESH):
        return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
