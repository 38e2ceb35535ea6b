"""Expert parallelism: sharded forward and gradient equal the single-device ones.

Routing is made uneven on purpose (a router bias sends every token to expert 0 and none to half
the experts), so dispatch buffers see empty experts, an overloaded device and padding rows.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import k2jax
from k2jax import expert_parallel, param_sharding, sharding
from k2jax.model import Transformer
from k2jax.moe import MoE

# Expert width M=160 and 3 shared experts (width 480) give the routed experts' weights shapes no
# other weight has, so the HLO check below can recognise them.
CONFIG = k2jax.ModelConfig.preset("tiny").replace(dtype="float32", moe_intermediate_size=160,
                                                  n_shared_experts=3)
MESHES = ["expert=8", "data=2,expert=4", "fsdp=2,tensor=2,expert=2"]


def skewed(params, config):
    """Biases every MoE layer's router towards expert 0 (and its group)."""
    bias = np.zeros((config.num_moe_layers, config.n_routed_experts), np.float32)
    bias[:, 0], bias[:, 5] = 3.0, 0.5
    params["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"] = jnp.asarray(bias)
    return params


def loss_and_logits(params, tokens_bt):
    logits, _, stats = Transformer(CONFIG).apply({"params": params}, tokens_bt)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens_bt[..., None], -1))
    return loss, (logits, stats.expert_load)


step = jax.value_and_grad(loss_and_logits, has_aux=True)


@pytest.fixture(scope="module")
def reference():
    params = skewed(k2jax.init_params(CONFIG, jax.random.key(0)), CONFIG)
    tokens = jax.random.randint(jax.random.key(1), (8, 6), 0, CONFIG.vocab_size)
    (_, (logits, load_le)), grads = jax.jit(step)(params, tokens)
    return params, tokens, logits, grads, np.asarray(load_le)


def expert_weight_gathers(hlo: str, config) -> list[str]:
    """All-gathers whose result is shaped like a (local) routed-expert weight."""
    d, m = config.hidden_size, config.moe_intermediate_size
    widths = {m, m // 2}
    hits = []
    for match in re.finditer(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo):
        dims = [int(x) for x in match.group(1).split(",") if x]
        if len(dims) >= 3 and ({dims[-2], dims[-1]} in ({d, w} for w in widths)):
            hits.append(match.group(0))
    return hits


def test_routing_is_uneven(reference):
    load_le = reference[4]
    assert (load_le == 0).any(axis=1).all(), "some experts must get no tokens"
    assert (load_le.max(axis=1) == 48).all(), "expert 0 must get every token"


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_forward_and_gradient_equal_single_device(reference, mesh_shape):
    params, tokens, logits_ref, grads_ref, _ = reference
    mesh = sharding.make_mesh(mesh_shape)
    with sharding.activate(mesh):
        params_sharded = param_sharding.shard_params(params, CONFIG, mesh)
        tokens_sharded = jax.device_put(tokens, sharding.batch_sharding(mesh, tokens.shape))
        compiled = jax.jit(step).lower(params_sharded, tokens_sharded).compile()
        (_, (logits, _)), grads = compiled(params_sharded, tokens_sharded)
    np.testing.assert_allclose(logits, logits_ref, atol=2e-5, rtol=1e-5)
    for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                                jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
    expert_grad = grads["moe_layers"]["mlp"]["experts"]["gate_proj"]["kernel"]
    experts = param_sharding.param_shardings(CONFIG, mesh)["moe_layers"]["mlp"]["experts"]
    want = experts["gate_proj"]["kernel"]
    assert expert_grad.sharding.is_equivalent_to(want, expert_grad.ndim)
    hlo = compiled.as_text()
    assert "all-to-all" in hlo
    assert not expert_weight_gathers(hlo, CONFIG)


def moe_layer(config, x_btd, mesh=None, **dispatch):
    """One MoE layer's output and input gradient, under `mesh` when given; `dispatch`:
    `expert_dispatch` / `expert_capacity_factor` config fields."""
    module = MoE(config.replace(**dispatch))
    params = jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p,
                          module.init(jax.random.key(2), x_btd)["params"],
                          is_leaf=lambda p: hasattr(p, "unbox"))
    bias = np.zeros(config.n_routed_experts, np.float32)
    bias[0] = 3.0
    params["gate"]["e_score_correction_bias"] = jnp.asarray(bias)

    def f(x):
        y, _, _ = module.apply({"params": params}, x)
        return jnp.sum(y * jnp.cos(y)), y

    fn = jax.jit(jax.value_and_grad(f, has_aux=True))
    if mesh is None:
        return fn(x_btd)
    with sharding.activate(mesh):
        return fn(x_btd)


@pytest.fixture(scope="module")
def moe_reference():
    """15 tokens (a multiple of no mesh's 8 batch shards, so dispatch pads) and their output."""
    x_btd = jax.random.normal(jax.random.key(4), (3, 5, CONFIG.hidden_size))
    return x_btd, moe_layer(CONFIG, x_btd)


def assert_equal(got, want):
    (_, y), dx = got
    (_, y_ref), dx_ref = want
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, atol=2e-5, rtol=1e-4)


def test_dense_dispatch_pads_uneven_token_counts(moe_reference):
    x_btd, want = moe_reference
    assert_equal(moe_layer(CONFIG, x_btd, sharding.make_mesh("expert=8"),
                           expert_dispatch="dense"), want)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """`ragged_all_to_all` from all_gather, per its documented semantics (XLA:CPU lacks it)."""
    del recv_sizes  # implied by the senders' send_sizes
    sources = jax.lax.all_gather(operand, axis_name)
    in_off, sizes, out_off = (jax.lax.all_gather(a, axis_name)
                              for a in (input_offsets, send_sizes, output_offsets))
    me = jax.lax.axis_index(axis_name)
    rows = jnp.arange(output.shape[0])
    for src in range(sources.shape[0]):
        rel = rows - out_off[src, me]
        inside = (rel >= 0) & (rel < sizes[src, me])
        taken = sources[src][jnp.clip(in_off[src, me] + rel, 0, operand.shape[0] - 1)]
        output = jnp.where(inside.reshape(-1, *(1,) * (output.ndim - 1)), taken, output)
    return output


def test_ragged_dispatch_bookkeeping(moe_reference, monkeypatch):
    monkeypatch.setattr(expert_parallel, "ragged_all_to_all", emulated_ragged_all_to_all)
    x_btd, want = moe_reference
    assert_equal(moe_layer(CONFIG, x_btd, sharding.make_mesh("data=2,expert=4"),
                           expert_dispatch="ragged"),
                 want)


def test_capacity_factor_drops_the_same_copies_in_both_dispatches(moe_reference, monkeypatch):
    monkeypatch.setattr(expert_parallel, "ragged_all_to_all", emulated_ragged_all_to_all)
    x_btd, ((_, y_ref), _) = moe_reference
    mesh = sharding.make_mesh("expert=8")
    # Every token sends a copy to expert 0's device: at the even share, most are dropped.
    dense = moe_layer(CONFIG, x_btd, mesh, expert_dispatch="dense", expert_capacity_factor=1.0)
    (_, y), _ = dense
    assert np.isfinite(np.asarray(y)).all()
    assert not np.allclose(y, y_ref, atol=1e-4)
    assert_equal(moe_layer(CONFIG, x_btd, mesh, expert_dispatch="ragged", expert_capacity_factor=1.0), dense)


def test_quantized_experts_split_values_and_scale_alike():
    # M=128 over tensor=2 leaves 2 scale groups per device; both halves of the INT4 weight
    # are split on the same axes.
    config = CONFIG.replace(moe_intermediate_size=128, quantized_linears=("routed_experts",))
    mesh = sharding.make_mesh("tensor=2,expert=4")
    spec = param_sharding.param_specs(config, mesh)["moe_layers"]["mlp"]["experts"]["down_proj"][
        "kernel"]
    assert spec.values == spec.scale == jax.sharding.PartitionSpec(None, "expert", "tensor", None)
    x_btd = jax.random.normal(jax.random.key(3), (4, 6, config.hidden_size))
    assert_equal(moe_layer(config, x_btd, mesh), moe_layer(config, x_btd))
