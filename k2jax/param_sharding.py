"""The parameter tree's shardings: `sharding.RULES` applied to every leaf of the model's tree.

Above the model (it reads the tree's logical axes from `k2jax.api`), while `k2jax.sharding`, which
the model's layers use, sits below it.

  param_specs(config, mesh), param_shardings(config, mesh, params=None)
      per-leaf specs / `NamedSharding`s of the parameter tree (`QuantizedWeight` values and
      scale split alike), after `sharding.check_mesh`; `serving_layout=True` for the tree of
      `k2jax.to_serving_layout`
  shard_params(params, config, mesh)    `jax.device_put` onto those shardings
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from k2jax import api, quant
from k2jax.sharding import check_mesh, logical_spec


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def param_specs(config, mesh, params=None, serving_layout: bool = False):
    """`PartitionSpec` of every parameter leaf (`params` defaults to `k2jax.param_shapes`);
    `serving_layout`: of the tree `k2jax.to_serving_layout` makes."""
    check_mesh(config, mesh)
    axes = api.param_axes(config, serving_layout)
    params = api.param_shapes(config, serving_layout) if params is None else params

    def leaf_spec(names, leaf):
        if isinstance(leaf, quant.QuantizedWeight):
            spec = logical_spec(names.values, mesh, leaf.values.shape, leaf.scale.shape)
            return quant.QuantizedWeight(spec, spec)
        return logical_spec(names, mesh, leaf.shape)

    return jax.tree.map(leaf_spec, axes, params,
                        is_leaf=lambda x: _is_axes(x) or isinstance(x, quant.QuantizedWeight))


def param_shardings(config, mesh, params=None, serving_layout: bool = False):
    """`NamedSharding` of every parameter leaf, for `jax.jit(in_shardings=...)` and
    `jax.device_put`. `params` (arrays or `ShapeDtypeStruct`s) overrides the config's own leaf
    types, e.g. a float tree for a quantized config under QAT; `serving_layout` as in
    `param_specs`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                        param_specs(config, mesh, params, serving_layout),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(params, config, mesh):
    """Places `params` on `mesh` according to `RULES`."""
    return jax.device_put(params, param_shardings(config, mesh, params))
