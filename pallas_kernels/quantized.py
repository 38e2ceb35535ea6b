"""The INT4 weight the kernels take: `QuantizedWeight(values int4 [..., in, out], scale [..., in/g, out])`.

Defined here, below both the kernels and the model (`k2jax.quant` builds and rounds them), so
that an op can take a float or an INT4 weight alike.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """INT4 weight: `values` int4 `[..., in, out]`, `scale` `[..., in/group, out]`."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def group_size(self) -> int:
        return self.values.shape[-2] // self.scale.shape[-2]
