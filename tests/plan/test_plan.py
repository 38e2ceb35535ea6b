"""`k2jax plan`: full-size K2 Thinking compiled against a mesh, memory against an analytic count;
the programs planned are the engine's and the trainer's own."""

import json
import os
import subprocess
import sys

import jax
import pytest

import k2jax
import plan
from cli import main as cli_main
from serve import paged_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def analytic_param_bytes(config, expert_shards: int) -> tuple[float, float]:
    """(all devices, one device) bytes of K2 Thinking's weights, counted from the architecture:
    INT4 routed experts at 4.5 bits per weight (4-bit values + a bf16 scale per 32), the router
    in float32, everything else bf16; on a mesh that only splits experts over `expert_shards`."""
    d, n, v = config.hidden_size, config.num_attention_heads, config.vocab_size
    q, c, r = config.q_lora_rank, config.kv_lora_rank, config.qk_rope_head_dim
    h, u, e, m = config.qk_nope_head_dim, config.v_head_dim, config.n_routed_experts, \
        config.moe_intermediate_size
    attention = d * q + q + q * n * (h + r) + d * (c + r) + c + c * n * (h + u) + n * u * d
    layer = attention + 2 * d
    dense = config.num_dense_layers * (layer + 3 * d * config.intermediate_size)
    moe_bf16 = config.num_moe_layers * (layer + 3 * d * config.shared_intermediate_size)
    router = config.num_moe_layers * (d * e + e) * 4
    experts = config.num_moe_layers * 3 * e * d * m * 4.5 / 8
    rest = (dense + moe_bf16 + 2 * v * d + d) * 2 + router
    return experts + rest, experts / expert_shards + rest


def test_collective_bytes_count_loop_iterations():
    hlo = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %a2a = (f32[2,8]{1,0}, f32[2,8]{1,0}) all-to-all(%x, %x), channel_id=1, replica_groups={{0,1}}
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %x)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (w: bf16[16,8]) -> f32[4,8] {
  %w = bf16[16,8]{1,0} parameter(0)
  %ag = bf16[32,8]{1,0} all-gather(%w), channel_id=2, replica_groups={{0,1}}, dimensions={0}
  %init = (s32[], f32[4,8]) custom-call(%ag), custom_call_target="init"
  %loop = (s32[], f32[4,8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"60"}}
  ROOT %r = f32[4,8]{1,0} get-tuple-element(%loop), index=1
}
"""
    totals = plan.collective_bytes(hlo)
    assert totals["all-gather"] == 16 * 8 * 2  # the operand, not the gathered result
    assert totals["all-to-all"] == 60 * 2 * 4 * 8 * 4  # two f32[4,8] operands, 60 iterations
    assert totals["all-reduce"] == 0


def test_full_k2_thinking_serve_plan_matches_analytic_count():
    """The full 1T-parameter config: planned on 8 simulated devices in a fresh process."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-m", "cli", "plan", "--config", "kimi-k2-thinking", "--mesh",
         "expert=8", "--batch", "16", "--seq", "2048", "--hbm", "141", "--json"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    config = k2jax.ModelConfig.preset("kimi-k2-thinking")
    total, per_device = analytic_param_bytes(config, expert_shards=8)
    assert report["devices"] == 8 and report["expert_parallel_axes"] == ["expert"]
    assert report["param_bytes_total"] == pytest.approx(total, rel=0.02)
    parts = report["per_device_bytes"]
    assert parts["params"] == pytest.approx(per_device, rel=0.02)
    # What the engine's compiled forward takes as arguments is exactly these parts.
    assert report["compiled_bytes"]["forward"]["arguments"] == pytest.approx(
        parts["params"] + parts["cache"] + parts["inputs"], rel=1e-3)
    # The page pool holds 16 sequences of 2048 tokens, split over the 8 devices.
    layers, cache_width = config.num_hidden_layers, config.cache_width
    assert parts["cache"] == layers * 16 * 2048 * cache_width * 2 // 8
    # The sampler keeps a prompt mask (bool) and output counts (int32) per slot and token,
    # each device those of its own slots.
    assert parts["sampler"] == 16 * config.vocab_size * 5 // 8
    assert report["collective_bytes_per_step"]["all-to-all"] > 0
    assert report["fits"] is True


def test_serve_plan_splits_the_page_pool_over_every_axis():
    """The latent cache is shared by all heads: under a tensor axis it is split, not copied."""
    config = k2jax.ModelConfig.preset("tiny")
    report = plan.plan(config, "expert=4,tensor=2", mode="serve", batch=8, seq=256)
    parts = report["per_device_bytes"]
    pool_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(
        lambda: paged_cache.init_pages(config, 8 * 256 // 16, 16, config.dtype))))
    assert parts["cache"] == pool_bytes // 8
    assert report["step"] == "decode" and report["compiled_bytes"]["sample"]["arguments"] > 0
    prefill = plan.plan(config, "expert=8", mode="serve", batch=8, seq=256, prefill_chunk=64)
    assert prefill["step"] == "prefill"
    # A 64-token chunk per row instead of one token: the inputs grow by that much.
    assert prefill["per_device_bytes"]["inputs"] > parts["inputs"]


def test_train_plan_counts_float32_master_and_adamw_moments():
    config = k2jax.ModelConfig.preset("tiny")
    report = plan.plan(config, "fsdp=2,expert=4", mode="train", batch=8, seq=16)
    parts = report["per_device_bytes"]
    assert report["expert_parallel_axes"] == ["fsdp", "expert"]
    # AdamW keeps two float32 moments per trained weight; the master is float32. The router
    # bias moves by balancing and has no moments.
    bias_bytes = 4 * config.num_moe_layers * config.n_routed_experts
    assert 2 * (parts["params"] - bias_bytes) <= parts["optimizer"] <= 2 * parts["params"]
    assert report["param_bytes_total"] == 4 * sum(
        x.size for x in jax.tree.leaves(k2jax.param_shapes(config)))
    assert report["compiled_bytes"]["step"]["arguments"] == pytest.approx(
        parts["params"] + parts["optimizer"] + parts["inputs"], rel=1e-3)
    assert report["collective_bytes_per_step"]["all-to-all"] > 0
    text = plan.format_report(report)
    assert "optimizer" in text and "all-to-all" in text


def test_bad_mesh_is_a_one_line_error(capsys):
    assert cli_main(["plan", "--config", "tiny", "--mesh", "expert8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "axis=size" in err
