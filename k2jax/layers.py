"""Building blocks where parameters meet activations: Linear, Embed, RMSNorm.

`Linear` is the one place a weight multiplies an activation. It carries the weight's logical axis
names and its storage: a `[in, out]` array or an INT4 `QuantizedWeight`. (Training's fake
quantization acts on the parameter tree, `train.qat`, not here.)
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax import quant

Axes = tuple[str | None, ...]


def dtype_of(name: str):
    return jnp.dtype(name)


def param_with_axes(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...],
                    dtype, axes: Axes):
    """Declares a parameter whose logical axis names are recorded for sharding."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def normal_init(std: float):
    return nn.initializers.normal(stddev=std)


def quantized_init(std: float, group_size: int):
    """Initialiser of a random INT4 `QuantizedWeight [..., in, out]`."""

    def init(key, shape, dtype):
        del dtype  # The scale dtype is the format's bf16.
        return quant.quantize(jax.random.normal(key, shape, jnp.float32) * std, group_size)

    return init


class Linear(nn.Module):
    """`y[..., out] = x[..., in] @ kernel[in, out]`, the kernel dense or INT4.

    Attributes:
      in_features, features: kernel shape `[in_features, features]`.
      axes: logical names of the kernel's (in, out) axes.
      quantized: store the kernel as an INT4 `QuantizedWeight` (group `group_size`).
      kernel_out_in: store the kernel transposed, `[out, in]`, when it is a float one (the
        serving layout: XLA:CPU multiplies a few rows by a wide matrix 2-3x faster this way
        round); INT4 kernels keep the format's `[in, out]`.
    """

    in_features: int
    features: int
    axes: Axes
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.bfloat16
    quantized: bool = False
    group_size: int = 32
    init_std: float = 0.02
    kernel_out_in: bool = False

    @property
    def stores_out_in(self) -> bool:
        """Whether the kernel is held `[out, in]` (`kernel_out_in` on a float kernel)."""
        return self.kernel_out_in and not self.quantized

    def setup(self):
        init = (quantized_init(self.init_std, self.group_size) if self.quantized
                else normal_init(self.init_std))
        shape, axes = (self.in_features, self.features), self.axes
        if self.stores_out_in:
            shape, axes = shape[::-1], axes[::-1]
        self.kernel = param_with_axes(self, "kernel", init, shape, self.param_dtype, axes)

    def __call__(self, x):
        if self.stores_out_in:
            *lead, din = x.shape
            y_on = jnp.einsum("oi,ni->on", self.kernel.astype(self.dtype),
                              x.reshape(-1, din).astype(self.dtype))
            # Kept apart from the transpose: XLA:CPU fused with it picks a slower matmul.
            y_on = jax.lax.optimization_barrier(y_on)
            return y_on.T.reshape(*lead, self.features)
        return quant.matmul(x.astype(self.dtype), self.kernel, self.dtype)


class Embed(nn.Module):
    """Token embedding table `[V, D]`."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.bfloat16
    init_std: float = 0.02

    @nn.compact
    def __call__(self, tokens_bt):
        table_vd = param_with_axes(self, "embedding", normal_init(self.init_std),
                                   (self.num_embeddings, self.features), self.param_dtype,
                                   ("vocab", "embed"))
        return jnp.take(table_vd, tokens_bt, axis=0).astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, the result cast back before the weight, as HF does."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x):
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],),
                                self.param_dtype, ("norm",))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class ExpertLinear(nn.Module):
    """The stacked kernels `[E, in, out]` of one routed-expert linear (dense or INT4).

    The MoE multiplies them with grouped matmuls over expert-sorted rows
    (`k2jax.expert_dispatch.expert_swiglu`), locally or inside the expert-parallel `shard_map`.
    """

    num_experts: int
    in_features: int
    features: int
    axes: Axes
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.bfloat16
    quantized: bool = False
    group_size: int = 32
    init_std: float = 0.02

    def setup(self):
        init = (quantized_init(self.init_std, self.group_size) if self.quantized
                else normal_init(self.init_std))
        self.kernel = param_with_axes(
            self, "kernel", init, (self.num_experts, self.in_features, self.features),
            self.param_dtype, self.axes)
