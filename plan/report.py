"""Compiling a step against a mesh and measuring it: per-device memory and collective bytes.

Serve plans the engine's own programs (`serve.engine.lower_step`): the forward of one decode
step or prefill chunk over the paged latent cache, and the sampler. Train plans the step
`k2jax train` runs (`train.step.build`): QAT forward and backward, gradient accumulation, the
optimizer update, router balancing and QK-clip, with the run's shardings.
"""

from __future__ import annotations

import math
import time

from plan.collectives import COLLECTIVES, collective_bytes


def _bytes(shape, dtype) -> float:
    import jax.numpy as jnp

    bits = 4 if jnp.dtype(dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) \
        else 8 * jnp.dtype(dtype).itemsize
    return math.prod(shape) * bits / 8


def tree_bytes(tree, per_device: bool) -> int:
    """Bytes of the `ShapeDtypeStruct` leaves (with shardings), in total or on one device."""
    import jax

    def leaf(x):
        shape = x.sharding.shard_shape(x.shape) if per_device else x.shape
        return _bytes(shape, x.dtype)

    return int(sum(leaf(x) for x in jax.tree.leaves(tree)))


def _peak(stats) -> int:
    """Bytes live while one compiled program runs: its arguments, fresh outputs, temporaries."""
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def _compiled_bytes(stats) -> dict[str, int]:
    return {"arguments": int(stats.argument_size_in_bytes),
            "outputs": int(stats.output_size_in_bytes),
            "aliased": int(stats.alias_size_in_bytes),
            "temporaries": int(stats.temp_size_in_bytes)}


def _summed(totals: list[dict[str, int]]) -> dict[str, int]:
    return {k: sum(t.get(k, 0) for t in totals) for k in COLLECTIVES
            if any(t.get(k) for t in totals) or k != "ragged-all-to-all"}


def _plan_serve(config, mesh, batch, seq, prefill_chunk, cache_dtype):
    from serve import engine

    step = engine.lower_step(config, mesh, rows=batch, tokens_per_row=prefill_chunk or 1,
                             context=seq, cache_dtype=cache_dtype)
    forward, sample = step["forward"].compile(), step["sample"].compile()
    parts = step["parts"]
    per_device = {name: tree_bytes(tree, per_device=True) for name, tree in parts.items()}
    fwd, smp = forward.memory_analysis(), sample.memory_analysis()
    per_device["activations"] = int(max(fwd.temp_size_in_bytes, smp.temp_size_in_bytes))
    per_device["outputs"] = int(fwd.output_size_in_bytes - fwd.alias_size_in_bytes)
    # The sampler's state stays on device through the forward; the weights and pages through
    # the sampler.
    per_device["total"] = max(_peak(fwd) + per_device["sampler"],
                              _peak(smp) + per_device["params"] + per_device["cache"])
    collectives = _summed([collective_bytes(forward.as_text()),
                           collective_bytes(sample.as_text())])
    return parts, per_device, {"forward": _compiled_bytes(fwd), "sample": _compiled_bytes(smp)}, \
        collectives


def _plan_train(config, mesh, batch, seq, remat, mesh_shape):
    from train import step as step_lib
    from train.config import TrainConfig

    cfg = TrainConfig(data="", out="", preset="tiny", batch_size=batch, seq_len=seq,
                      remat_policy=None if remat == "none" else remat, mesh=mesh_shape)
    program = step_lib.build(config, cfg, mesh)
    compiled = program.lower().compile()
    parts = {"params": program.state["params"], "optimizer": program.state["opt_state"],
             "inputs": program.batch}
    per_device = {name: tree_bytes(tree, per_device=True) for name, tree in parts.items()}
    stats = compiled.memory_analysis()
    per_device["activations"] = int(stats.temp_size_in_bytes)
    per_device["outputs"] = int(stats.output_size_in_bytes - stats.alias_size_in_bytes)
    per_device["total"] = _peak(stats)
    return parts, per_device, {"step": _compiled_bytes(stats)}, \
        collective_bytes(compiled.as_text())


def plan(config, mesh_shape, *, mode="serve", batch=8, seq=4096, prefill_chunk=None,
         cache_dtype=None, remat="nothing_saveable", dispatch="auto", capacity_factor=None,
         hbm_gib=None) -> dict:
    """Compiles the step of `mode` for `config` on a mesh of `mesh_shape` over the available
    devices and returns the report (see `plan.cli`); sizes are bytes.

    serve: `batch` rows, each with a cache of `seq` tokens; one decode step, or with
    `prefill_chunk` a prefill of that many tokens per row. train: `batch` sequences of `seq`
    tokens, the other `TrainConfig` options at their defaults (AdamW, bf16 compute, QAT on the
    config's INT4 groups, so float32 master weights).
    """
    import jax

    from k2jax import expert_parallel, sharding

    mesh = sharding.make_mesh(mesh_shape)
    config = config.replace(expert_dispatch=dispatch, expert_capacity_factor=capacity_factor)
    start = time.perf_counter()
    with sharding.activate(mesh):
        if mode == "serve":
            parts, per_device, compiled, collectives = _plan_serve(
                config, mesh, batch, seq, prefill_chunk, cache_dtype)
        else:
            parts, per_device, compiled, collectives = _plan_train(
                config, mesh, batch, seq, remat, mesh_shape)
    seconds = time.perf_counter() - start
    report = {
        "mesh": {a: n for a, n in zip(mesh.axis_names, mesh.axis_sizes)},
        "devices": mesh.size,
        "platform": jax.devices()[0].platform,
        "mode": mode,
        "step": "train" if mode == "train" else "prefill" if prefill_chunk else "decode",
        "batch": batch,
        "seq": seq,
        "prefill_chunk": prefill_chunk,
        "expert_parallel_axes": list(expert_parallel.expert_axes(mesh, config.n_routed_experts)),
        "dispatch": expert_parallel.resolve_impl(dispatch),
        "capacity_factor": capacity_factor,
        "param_bytes_total": tree_bytes(parts["params"], per_device=False),
        "per_device_bytes": per_device,
        "compiled_bytes": compiled,
        "collective_bytes_per_step": collectives,
        "compile_seconds": round(seconds, 1),
    }
    if hbm_gib is not None:
        report["hbm_bytes"] = int(hbm_gib * 2**30)
        report["fits"] = per_device["total"] <= report["hbm_bytes"]
    return report


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_report(r: dict) -> str:
    mesh = ",".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1) or "single device"
    drops = ("dropless" if r["capacity_factor"] is None
             else f"capacity factor {r['capacity_factor']:g}")
    step = f"{r['step']} step" + (f" ({r['prefill_chunk']} tokens per row)"
                                   if r.get("prefill_chunk") else "")
    lines = [f"{r.get('config', 'model')}: {step}, batch {r['batch']} x seq {r['seq']}, "
             f"mesh {mesh} ({r['devices']} {r['platform']} devices, compiled in "
             f"{r['compile_seconds']} s)",
             f"  expert-parallel over: {','.join(r['expert_parallel_axes']) or 'none'} "
             f"({r['dispatch']} all-to-all, {drops})",
             f"  parameters, all devices: {_size(r['param_bytes_total'])}",
             "  per device:"]
    for name, value in r["per_device_bytes"].items():
        lines.append(f"    {name:<12} {_size(value):>14}")
    if "fits" in r:
        lines.append(f"  fits in {_size(r['hbm_bytes'])}: {'yes' if r['fits'] else 'NO'}")
    lines.append("  collectives per step, per device:")
    for kind, value in r["collective_bytes_per_step"].items():
        lines.append(f"    {kind:<18} {_size(value):>14}")
    return "\n".join(lines)
