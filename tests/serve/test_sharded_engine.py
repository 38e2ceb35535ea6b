"""The engine on a mesh of 8 CPU devices gives the single-device engine's tokens, with the
weights placed by the sharding rules, routed experts expert-parallel and the page pool split
over every device."""

import jax
import numpy as np
import pytest

import k2jax
from k2jax import param_sharding, sharding
from serve import engine as engine_module
from serve import paged_cache
from serve.engine import Engine
from serve.sampling import SamplingParams
from tests.hf_reference import params_from_hf_model, random_hf_model

CONFIG = k2jax.ModelConfig.preset("tiny").replace(dtype="float32")
# Two slots per device under an 8-device mesh; 8 pages per device hold one sequence of
# max_seq_len, so two long ones on the same device preempt.
ENGINE = dict(max_batch=16, max_seq_len=64, page_size=8, prefill_chunk=16, num_pages=64)
MESHES = ["expert=8", "data=2,expert=4", "expert=4,tensor=2"]
RNG = np.random.default_rng(3)


def _prompt(n):
    return RNG.integers(3, CONFIG.vocab_size, n).tolist()


SYSTEM = _prompt(24)  # three full pages that later requests share
# (arrival step, prompt, max_new_tokens): more requests than slots per device, shared prefixes
# and sequences long enough to exhaust a device's pages.
REQUESTS = [(0, SYSTEM + _prompt(5), 30), (0, _prompt(30), 26), (1, SYSTEM + _prompt(3), 30),
            (2, _prompt(9), 10), (3, SYSTEM + _prompt(7), 12), (4, _prompt(17), 15),
            (4, _prompt(4), 9), (5, SYSTEM + _prompt(2), 11), (5, _prompt(12), 13)]
REQUESTS += [(6 + i, _prompt(20 + i), 36) for i in range(12)]


@pytest.fixture(scope="module")
def params():
    return jax.device_get(params_from_hf_model(CONFIG, random_hf_model(CONFIG, seed=5)))


def _run(engine):
    """Feeds `REQUESTS` at their arrival steps; returns the greedy tokens of each."""
    pending, ids, step = list(enumerate(REQUESTS)), {}, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][1][0] <= step:
            index, (_, prompt, new_tokens) = pending.pop(0)
            ids[index] = engine.add_request(
                prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0))
        engine.step()
        step += 1
        assert step < 400, "the engine stopped making progress"
    return [engine.pop_result(ids[i]).token_ids for i in range(len(REQUESTS))]


@pytest.fixture(scope="module")
def single_device(params):
    return _run(Engine(CONFIG, params, **ENGINE))


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_engine_equals_one_device(params, single_device, spec):
    mesh = sharding.make_mesh(spec)
    engine = Engine(CONFIG, params, mesh=mesh, **ENGINE)
    assert _run(engine) == single_device
    # The run exercised what the layout has to get right.
    assert engine.stats["preemptions"] > 0
    assert engine.stats["prefix_cached_tokens"] > 0
    assert engine.allocator.num_free == engine.allocator.num_pages


def test_params_are_placed_by_the_rules(params):
    mesh = sharding.make_mesh("expert=4,tensor=2")
    engine = Engine(CONFIG, params, mesh=mesh, max_batch=8, max_seq_len=64, page_size=8)
    expected = param_sharding.param_specs(CONFIG, mesh, serving_layout=True)
    got = jax.tree.map(lambda a: a.sharding.spec, engine.params)
    assert jax.tree.leaves(got) == jax.tree.leaves(expected)
    gate = engine.params["moe_layers"]["0"]["mlp"]["experts"]["gate_proj"]["kernel"]
    assert gate.addressable_shards[0].data.shape == (2, CONFIG.hidden_size,
                                                     CONFIG.moe_intermediate_size // 2)


@pytest.mark.parametrize("spec", MESHES)
def test_pool_bytes_per_device_are_the_pool_over_the_mesh(params, spec):
    mesh = sharding.make_mesh(spec)
    engine = Engine(CONFIG, params, mesh=mesh, **ENGINE)
    for pool in jax.tree.leaves(engine.pools):
        shards = pool.addressable_shards
        assert len(shards) == mesh.size
        assert all(s.data.nbytes * mesh.size == pool.nbytes for s in shards)
        # Every device holds a different slice of the pages: nothing is replicated.
        assert len({s.index[1].start for s in shards}) == mesh.size


@pytest.mark.parametrize("spec", ["expert=8", "expert=4,tensor=2"])
def test_decode_step_never_gathers_routed_experts(params, spec):
    """The compiled decode step moves tokens to experts (all-to-all) and gathers no expert
    weights: outside attention no all-gather in it is as large as one device's share of a
    routed-expert kernel. (Attention moves each row's queries, all heads, to the device that
    holds the row's pages: `[rows, heads, latent]`, far less than the row's context.)"""
    mesh = sharding.make_mesh(spec)
    engine = Engine(CONFIG, params, mesh=mesh, max_batch=8, max_seq_len=64, page_size=8)
    rows = 8
    inputs = jax.device_put(
        (np.zeros((rows, 1), np.int32), np.zeros((rows, 1), np.int32),
         np.zeros((rows, engine.max_pages_per_seq), np.int32), np.zeros(rows, np.int32)),
        paged_cache.rows_sharding(mesh))
    with sharding.activate(mesh):
        hlo = engine_module._forward.lower(CONFIG, engine.params, engine.pools, *inputs,
                                           mesh=mesh).compile().as_text()
    experts = engine.params["moe_layers"]["0"]["mlp"]["experts"]
    share = min(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(experts))
    gathers = [line for line in hlo.splitlines()
               if (" all-gather(" in line or " all-gather-start(" in line)
               and "/self_attn/" not in line]
    sizes = [_result_bytes(line) for line in gathers]
    assert all(size < share for size in sizes), [g for g, s in zip(gathers, sizes) if s >= share]
    assert "all-to-all" in hlo


def _result_bytes(hlo_line: str) -> int:
    """Bytes of an HLO instruction's (first) result, e.g. `%x = f32[2,1,64]{...} op(...)`."""
    import re

    dtype, dims = re.search(r"= \(?(\w+)\[([\d,]*)\]", hlo_line).groups()
    itemsize = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "f64": 8}[dtype]
    return itemsize * int(np.prod([int(d) for d in dims.split(",") if d]))


def test_mesh_refuses_batch_and_pages_that_do_not_split(params):
    mesh = sharding.make_mesh("expert=8")
    with pytest.raises(ValueError, match="max_batch=4 does not split"):
        Engine(CONFIG, params, mesh=mesh, max_batch=4)
    with pytest.raises(ValueError, match=r"num_pages=36 does not split"):
        Engine(CONFIG, params, mesh=mesh, max_batch=8, max_seq_len=64, page_size=8,
               num_pages=36)
    with pytest.raises(ValueError, match=r"\(4 per device\) cannot hold one sequence"):
        Engine(CONFIG, params, mesh=mesh, max_batch=8, max_seq_len=64, page_size=8,
               num_pages=32)


def test_checkpoint_layout_engine_equals_one_device(params, single_device, monkeypatch):
    """Accelerators compute with the checkpoint's stacked tree as loaded (no second copy of
    the weights): that path, forced here on CPU, gives the same tokens on a mesh."""
    monkeypatch.setattr(engine_module, "uses_serving_layout", lambda: False)
    engine = Engine(CONFIG, params, mesh=sharding.make_mesh("expert=4,tensor=2"), **ENGINE)
    assert not engine.serving_layout
    assert _run(engine) == single_device


SAMPLED = [SamplingParams(max_new_tokens=12, temperature=0.9, seed=11, logprobs=3),
           SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9, seed=12,
                          repetition_penalty=1.3, logprobs=1),
           SamplingParams(max_new_tokens=9, temperature=1.1, min_p=0.05, seed=13,
                          presence_penalty=0.5, frequency_penalty=0.4, logit_bias={7: 5.0}),
           SamplingParams(max_new_tokens=11, temperature=0, repetition_penalty=1.5, logprobs=2)]


SAMPLED_PROMPTS = [SYSTEM + _prompt(4), _prompt(13), SYSTEM + _prompt(6), _prompt(21)] * 3


def _sampled(engine):
    ids = [engine.add_request(p, SAMPLED[i % len(SAMPLED)])
           for i, p in enumerate(SAMPLED_PROMPTS)]
    for _ in range(200):
        if not engine.has_unfinished():
            break
        engine.step()
    return [engine.pop_result(i) for i in ids]


def test_sampling_on_a_mesh_equals_one_device(params):
    """Seeded draws with filters, penalties, logit bias and logprobs: each device samples its
    own rows, with the single-device arithmetic."""
    one = _sampled(Engine(CONFIG, params, **ENGINE))
    engine = Engine(CONFIG, params, mesh=sharding.make_mesh("expert=4,tensor=2"), **ENGINE)
    many = _sampled(engine)
    assert [r.token_ids for r in many] == [r.token_ids for r in one]
    for a, b in zip(many, one):
        if b.logprobs is not None:
            # The forward's float32 sums run in another order across tensor ranks.
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
            assert [sorted(t) for t in a.top_logprobs] == [sorted(t) for t in b.top_logprobs]
    # The penalty state (prompt mask, output counts per slot) is split by slot.
    for state in engine.penalty:
        assert state.addressable_shards[0].data.shape == (2, CONFIG.vocab_size)


@pytest.mark.parametrize("spec", ["expert=8", "expert=4,tensor=2"])
def test_sampler_gathers_no_logits(params, spec):
    """No device receives the `[B, V]` logits of the batch: the compiled sampler has no
    all-gather and no all-to-all."""
    mesh = sharding.make_mesh(spec)
    with sharding.activate(mesh):
        step = engine_module.lower_step(CONFIG, mesh, rows=16, tokens_per_row=1, context=64)
    hlo = step["sample"].compile().as_text()
    assert not [line for line in hlo.splitlines()
                if any(f" {op}(" in line or f" {op}-start(" in line
                       for op in ("all-gather", "all-to-all", "collective-permute"))]
