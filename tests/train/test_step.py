"""The train step: the router bias changes only by the balancing rule (no gradient, optimizer
state, update or decay), frozen groups stay put, Muon + balance loss + QK-clip + gradient
accumulation run together; gradient accumulation equals one big batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.common import CONFIG, fast_jit, random_master, random_tokens
from train import balance, optimizer, qat, step
from train.config import PARAM_GROUPS, TrainConfig

BIAS = balance.BIAS_PATH


def _batch(accum, rows, seq_len=16, seed=1):
    tokens = np.asarray(random_tokens(CONFIG, (accum * rows, seq_len + 1), seed))
    segments = np.where(np.arange(seq_len) < seq_len // 2, 1, 2)[None].repeat(accum * rows, 0)
    positions = np.where(segments == 1, np.arange(seq_len), np.arange(seq_len) - seq_len // 2)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
             "weights": np.ones((accum * rows, seq_len), np.float32),
             "segment_ids": segments.astype(np.int32), "positions": positions.astype(np.int32)}
    return {k: jnp.asarray(v.reshape(accum, rows, seq_len)) for k, v in batch.items()}


def _run(cfg, master, batch, qat_groups=("routed_experts",)):
    model_config = CONFIG.replace(quantized_linears=(), dtype=cfg.compute_dtype)
    tx = optimizer.make_optimizer(cfg)
    trainable = optimizer.trainable_paths(master, cfg.trainable)
    state = step.init_state(master, tx, trainable)
    fn = fast_jit(step.make_step(model_config, cfg, qat_groups, trainable, tx))
    return state, fn(state, batch)


@pytest.fixture(scope="module")
def master():
    m = random_master(CONFIG)
    bias = qat.flat(m)[BIAS]
    return qat.unflat({**qat.flat(m), BIAS: bias + jnp.linspace(-0.01, 0.01, bias.size).reshape(
        bias.shape)})


@pytest.fixture(scope="module")
def muon_step(master):
    cfg = TrainConfig(data="-", out="-", optimizer="muon", learning_rate=0.05, warmup_steps=0,
                      weight_decay=0.5, aux_loss_coef=0.01, qk_clip_threshold=1e-3,
                      bias_update_rate=0.01, grad_accum=2, batch_size=4,
                      trainable=tuple(g for g in PARAM_GROUPS if g != "embed"))
    return cfg, *_run(cfg, master, _batch(2, 2))


def test_router_bias_moves_only_by_the_balancing_rule(muon_step):
    cfg, before, (after, metrics) = muon_step
    load = np.asarray(metrics["expert_load"])
    assert load.shape == (CONFIG.num_moe_layers, CONFIG.n_routed_experts)
    assert load.sum() == 4 * 16 * CONFIG.num_experts_per_tok * CONFIG.num_moe_layers
    old = np.asarray(qat.flat(before["params"])[BIAS])
    step_size = np.float32(cfg.bias_update_rate)
    expected = old + step_size * np.sign(load.mean(-1, keepdims=True) - load).astype(np.float32)
    assert np.any(expected != old)
    np.testing.assert_array_equal(np.asarray(qat.flat(after["params"])[BIAS]), expected)


def test_no_optimizer_state_for_bias_or_frozen_groups(muon_step):
    _, before, (after, _) = muon_step
    paths = [tuple(getattr(k, "key", getattr(k, "name", k)) for k in p)
             for p, _ in jax.tree_util.tree_flatten_with_path(after["opt_state"])[0]]
    assert paths and not any(BIAS[-1] in p or "embed_tokens" in p for p in paths)
    assert any("experts" in p for p in paths)
    leaves_before, leaves_after = qat.flat(before["params"]), qat.flat(after["params"])
    np.testing.assert_array_equal(np.asarray(leaves_after[("embed_tokens", "embedding")]),
                                  np.asarray(leaves_before[("embed_tokens", "embedding")]))
    for path in leaves_before:
        if path not in (BIAS, ("embed_tokens", "embedding")):
            assert not np.array_equal(np.asarray(leaves_after[path]),
                                      np.asarray(leaves_before[path])), path
    assert int(after["step"]) == 1


def test_step_metrics(muon_step):
    cfg, _, (_, metrics) = muon_step
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 5.0
    assert float(metrics["balance_loss"]) > 0 and float(metrics["grad_norm"]) > 0
    assert float(metrics["tokens"]) == 4 * 16
    assert int(metrics["clipped_heads"]) > 0 and float(metrics["max_logit"]) > 1e-3


def test_gradient_accumulation_equals_one_batch(master):
    # With eps far above every |gradient|, AdamW's first update is -lr * gradient, so the
    # parameter change shows the accumulated gradient itself rather than its sign.
    cfg = TrainConfig(data="-", out="-", learning_rate=1.0, warmup_steps=0, eps=1.0,
                      weight_decay=0.0, grad_clip=None, compute_dtype="float32", batch_size=4)
    one = _batch(1, 4)
    two = {k: v.reshape(2, 2, -1) for k, v in one.items()}
    before, (a, ma) = _run(cfg, master, one, qat_groups=())
    _, (b, mb) = _run(cfg.replace(grad_accum=2), master, two, qat_groups=())
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(ma["expert_load"]), np.asarray(mb["expert_load"]))
    start = qat.flat(before["params"])
    for path, leaf in qat.flat(a["params"]).items():
        if path != BIAS:
            np.testing.assert_allclose(np.asarray(leaf - start[path]),
                                       np.asarray(qat.flat(b["params"])[path] - start[path]),
                                       rtol=1e-3, atol=1e-7, err_msg="/".join(path))


def test_optimizer_state_sharded_like_params():
    import optax
    from jax.sharding import PartitionSpec

    import k2jax
    from k2jax import sharding
    from train import mesh as train_mesh

    mesh = sharding.make_mesh("fsdp=2,tensor=2,expert=2")
    params = k2jax.param_shapes(CONFIG.replace(quantized_linears=(), dtype="float32"))
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
             "opt_state": jax.eval_shape(optax.adamw(1e-3).init, params)}
    shardings = train_mesh.state_shardings(state, CONFIG, mesh)
    adam = shardings["opt_state"][0]
    assert adam.mu == shardings["params"] and adam.nu == shardings["params"]
    assert adam.count.spec == PartitionSpec()
    specs = {s.spec for s in jax.tree.leaves(adam.mu)}
    assert len(specs) > 1  # the moments really are split, not all replicated
