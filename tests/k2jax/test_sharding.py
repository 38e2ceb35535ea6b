"""The mesh builder, the rules table and the shardings derived from it (no compiled model)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import k2jax
from k2jax import param_sharding, sharding

TINY = k2jax.ModelConfig.preset("tiny")


def leaves_with_paths(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in
            jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))}


def test_parse_mesh_shape():
    assert sharding.parse_mesh_shape("expert=8, tensor=2") == {
        "data": 1, "fsdp": 1, "expert": 8, "tensor": 2}
    assert sharding.parse_mesh_shape({"data": 2}) == {"data": 2, "fsdp": 1, "expert": 1,
                                                      "tensor": 1}
    assert sharding.parse_mesh_shape(None) == dict.fromkeys(sharding.MESH_AXES, 1)
    for bad, message in (("expert8", "axis=size"), ("pipe=2", "unknown"),
                         ("expert=2,expert=4", "twice"), ({"tensor": 0}, "positive")):
        with pytest.raises(ValueError, match=message):
            sharding.parse_mesh_shape(bad)


def test_make_mesh_uses_all_devices():
    mesh = sharding.make_mesh("data=2,expert=4")
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == {"data": 2, "fsdp": 1, "expert": 4,
                                                           "tensor": 1}
    assert sharding.describe(mesh) == "data=2,expert=4"
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.make_mesh("expert=4")


def test_param_specs_follow_the_rules():
    mesh = sharding.make_mesh("fsdp=2,tensor=2,expert=2")
    specs = leaves_with_paths(param_sharding.param_specs(TINY, mesh))
    moe = "['moe_layers']"
    assert specs[f"{moe}['mlp']['experts']['gate_proj']['kernel']"] == P(
        None, ("fsdp", "expert"), None, "tensor")
    assert specs[f"{moe}['mlp']['experts']['down_proj']['kernel']"] == P(
        None, ("fsdp", "expert"), "tensor", None)
    assert specs[f"{moe}['mlp']['shared_experts']['gate_proj']['kernel']"] == P(
        None, "fsdp", "tensor")
    assert specs[f"{moe}['self_attn']['q_b_proj']['kernel']"] == P(None, None, "tensor")
    assert specs[f"{moe}['self_attn']['o_proj']['kernel']"] == P(None, "tensor", "fsdp")
    assert specs[f"{moe}['mlp']['gate']['e_score_correction_bias']"] == P(None, None)
    assert specs["['embed_tokens']['embedding']"] == P(("tensor", "fsdp"), None)
    assert specs["['lm_head']['kernel']"] == P(None, ("tensor", "fsdp"))


def test_specs_only_split_dimensions_that_divide():
    mesh = sharding.make_mesh("data=2,expert=4")
    assert sharding.logical_spec(("batch", "length"), mesh, (8, 3)) == P(("data", "expert"), None)
    assert sharding.logical_spec(("batch", "length"), mesh, (2, 3)) == P("data", None)
    assert sharding.logical_spec(("batch", "length"), mesh, (1, 3)) == P(None, None)
    # 6 experts: only data-sized splits would divide, and data does not split experts.
    assert sharding.logical_spec(("expert", "embed"), mesh, (6, 64)) == P(None, None)


def test_full_size_specs_divide_every_dimension():
    config = k2jax.ModelConfig.preset("kimi-k2-thinking")
    mesh = jax.sharding.AbstractMesh((1, 2, 2, 2), sharding.MESH_AXES)
    shapes = k2jax.param_shapes(config)
    specs = param_sharding.param_specs(config, mesh, shapes)
    experts = specs["moe_layers"]["mlp"]["experts"]["down_proj"]["kernel"]
    assert experts.values == experts.scale == P(None, ("fsdp", "expert"), "tensor", None)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    for spec, leaf in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)),
                          jax.tree.leaves(shapes)):
        for dim, entry in zip(leaf.shape, spec):
            names = () if entry is None else (entry,) if isinstance(entry, str) else entry
            assert dim % int(np.prod([sizes[n] for n in names])) == 0


def test_cache_and_batch_split_over_batch_axes():
    mesh = sharding.make_mesh("data=2,expert=2,tensor=2")
    cache = jax.eval_shape(lambda: k2jax.init_cache(TINY, 4, 16))
    specs = jax.tree.map(lambda s: s.spec, sharding.cache_shardings(cache, mesh))
    assert specs["moe_layers"].ckv == P(None, ("data", "expert"), None, None)
    assert specs["dense_layers"].kpe == P(None, ("data", "expert"), None, None)
    assert sharding.batch_sharding(mesh, (2, 7)).spec == P("data", None)


def test_activate_sets_mesh_and_rules():
    mesh = sharding.make_mesh("data=2,expert=4")
    assert sharding.active_mesh() is None
    with sharding.activate(mesh):
        assert sharding.active_mesh().axis_names == sharding.MESH_AXES

        @jax.jit
        def f(x):
            return nn.with_logical_constraint(x * 2, ("batch", "embed"))

        y = f(jnp.ones((8, 4)))
    assert y.sharding.is_equivalent_to(jax.NamedSharding(mesh, P(("data", "expert"))), 2)
    assert sharding.active_mesh() is None


def test_shard_params_places_quantized_weights():
    config = TINY.replace(quantized_linears=("routed_experts",))
    mesh = sharding.make_mesh("expert=8")
    params = param_sharding.shard_params(k2jax.init_params(config, jax.random.key(0)), config, mesh)
    kernel = params["moe_layers"]["mlp"]["experts"]["up_proj"]["kernel"]
    assert isinstance(kernel, k2jax.QuantizedWeight)
    for part in (kernel.values, kernel.scale):
        assert part.sharding.spec == P(None, "expert", None, None)
        assert part.addressable_shards[0].data.shape[1] == config.n_routed_experts // 8
