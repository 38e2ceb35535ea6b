"""The sorted/grouped-matmul MoE dispatch against a dense one-hot reference kept for tests."""

import jax
import jax.numpy as jnp
import numpy as np

import k2jax
from k2jax.expert_dispatch import permute, unpermute
from k2jax.moe import MoE

CONFIG = k2jax.ModelConfig.preset("tiny").replace(dtype="float32")


def dense_moe_reference(x_td, weights_tk, indices_tk, experts):
    """Every expert on every token, masked by the one-hot routing: O(T * E), tests only."""
    gate, up, down = (experts[k]["kernel"] for k in ("gate_proj", "up_proj", "down_proj"))
    h_etm = jax.nn.silu(jnp.einsum("td,edm->etm", x_td, gate)) * jnp.einsum("td,edm->etm",
                                                                             x_td, up)
    y_etd = jnp.einsum("etm,emd->etd", h_etm, down)
    combine_te = jnp.zeros((x_td.shape[0], gate.shape[0])).at[
        jnp.arange(x_td.shape[0])[:, None], indices_tk].add(weights_tk)
    return jnp.einsum("etd,te->td", y_etd, combine_te)


def test_permute_unpermute_inverse():
    x_td = jax.random.normal(jax.random.key(0), (7, 4))
    indices_tk = jnp.array([[0, 3], [3, 1], [0, 1], [2, 3], [3, 0], [1, 2], [0, 3]])
    x_sorted, group_sizes, order = permute(x_td, indices_tk, 5)
    np.testing.assert_array_equal(group_sizes, [4, 3, 2, 5, 0])
    experts_of_rows = np.asarray(indices_tk).reshape(-1)[np.asarray(order)]
    assert (np.diff(experts_of_rows) >= 0).all()
    ones_tk = jnp.ones(indices_tk.shape)
    np.testing.assert_allclose(unpermute(x_sorted, order, ones_tk), 2 * x_td, rtol=1e-6)


def test_grouped_dispatch_equals_dense_reference_with_skewed_routing():
    module = MoE(CONFIG)
    x_btd = jax.random.normal(jax.random.key(1), (2, 9, CONFIG.hidden_size))
    params = module.init(jax.random.key(2), x_btd)["params"]
    # A strong bias on expert 0 makes every token pick its group (experts 0-3) and expert 0:
    # expert 0 gets every token, 1-3 share the rest, 4-7 get none.
    bias = np.zeros(CONFIG.n_routed_experts, np.float32)
    bias[0] = 3.0
    params["gate"]["e_score_correction_bias"] = jnp.asarray(bias)
    params = jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, params,
                          is_leaf=lambda p: hasattr(p, "unbox"))
    y_btd, load_e, _ = module.apply({"params": params}, x_btd)
    load_e = np.asarray(load_e)
    assert load_e[0] == 18 and (load_e[4:] == 0).all() and load_e.sum() == 36

    from k2jax.moe import MLP, Router
    x_td = x_btd.reshape(-1, CONFIG.hidden_size)
    weights_tk, indices_tk, _ = Router(CONFIG).apply({"params": params["gate"]}, x_td)
    expected = dense_moe_reference(x_td, weights_tk, indices_tk, params["experts"])
    expected += MLP(CONFIG, CONFIG.shared_intermediate_size, "shared_experts").apply(
        {"params": params["shared_experts"]}, x_td)
    np.testing.assert_allclose(np.asarray(y_btd).reshape(-1, CONFIG.hidden_size),
                               np.asarray(expected), rtol=2e-5, atol=2e-6)
