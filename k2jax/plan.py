"""`k2jax plan`: compile a config against a mesh with no real arrays and report per-device memory.

The step (serve: one decode step or a prefill with the latent cache; train: forward, backward and
an AdamW update on float32 master weights) is lowered with `jax.ShapeDtypeStruct` inputs that
carry their shardings, compiled ahead of time, and measured:

- parameters, optimizer state, cache and inputs per device, from their shardings (int4 counted
  packed, two per byte); their sum is the compiled executable's argument size;
- activations: the compiled temporaries (`memory_analysis().temp_size_in_bytes`);
- collective bytes per step per device, from the compiled HLO (operand sizes of all-to-all,
  all-gather, reduce-scatter, all-reduce and collective-permute, times the trip count of the
  layer loops they sit in).

A mesh larger than this machine's devices is planned on that many simulated CPU devices: the
command re-runs itself with `--xla_force_host_platform_device_count=N`. XLA:CPU computes bf16
matmuls and collectives in float32, runs the reference (dequantizing) INT4 grouped matmul and has
only the dense all-to-all (worst-case buffers when dropless), so its activation and collective
figures are upper bounds for GPU/TPU; parameter, optimizer and cache figures are exact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

EXAMPLE = """example (tiny config, 8 simulated devices, runs on a laptop CPU):
  k2jax plan --config tiny --mesh expert=4,tensor=2 --mode serve --batch 8 --seq 256
does K2 Thinking (INT4) fit on 8xH200 for batch 64 at 8k context?
  k2jax plan --config kimi-k2-thinking --mesh expert=8 --batch 64 --seq 8192 --hbm 141
"""

_CHILD_ENV = "K2JAX_PLAN_CHILD"
# XLA:CPU would hoist the int4->int8 and bf16->f32 conversions of all stacked layer weights out
# of the layer loop (it cannot compute on either type), materialising whole-model copies that
# GPU/TPU never make; keeping them in the loop makes CPU figures describe the accelerators.
_CPU_XLA_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="preset name (kimi-k2-thinking, deepseek-v3, tiny, ...) or a "
                             "config.json / model directory")
    parser.add_argument("--mesh", default=None,
                        help="mesh axis sizes, e.g. expert=8,tensor=2 (default: one device); "
                             "each axis must split the model dimensions it shards")
    parser.add_argument("--mode", choices=("serve", "train"), default="serve")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=4096,
                        help="serve: cache length; train: tokens per sequence")
    parser.add_argument("--prefill", action="store_true",
                        help="serve: plan the prefill of --seq tokens instead of one decode step")
    parser.add_argument("--remat", default="nothing_saveable",
                        help="train: jax.checkpoint_policies name for each layer, or 'none'")
    parser.add_argument("--dispatch", choices=("auto", "dense", "ragged"), default="auto",
                        help="expert-parallel all-to-all (ragged needs GPU/TPU)")
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="drop expert copies beyond this multiple of the even share "
                             "(default: dropless)")
    parser.add_argument("--hbm", type=float, default=None,
                        help="device memory in GiB: also say whether the step fits")
    parser.add_argument("--native", action="store_true",
                        help="compile for this machine's own devices (must match the mesh) "
                             "instead of simulated CPU devices")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from k2jax import sharding
    from k2jax.cli import UserError

    # Both are checked here, before a child process spends seconds starting JAX.
    config = load_config(args.config)
    try:
        devices = sharding.device_count(args.mesh)
        sharding.check_mesh(config, args.mesh)
    except sharding.MeshError as e:
        raise UserError(f"--mesh {args.mesh}: {e.reason}") from None
    if not args.native and not os.environ.get(_CHILD_ENV):
        return _rerun_with_cpu_devices(args, devices)
    report = plan(config, args.mesh, mode=args.mode, batch=args.batch,
                  seq=args.seq, prefill=args.prefill, remat=args.remat, dispatch=args.dispatch,
                  capacity_factor=args.capacity_factor, hbm_gib=args.hbm)
    report["config"] = args.config
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _rerun_with_cpu_devices(args, devices: int) -> int:
    """Runs this plan in a fresh process that sees `devices` simulated CPU devices."""
    argv = []
    for dest, value in vars(args).items():
        flag = "--" + dest.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (None, False):
            argv += [flag, str(value)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_CHILD_ENV: "1"})
    env["XLA_FLAGS"] = " ".join(
        [f for f in env.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
        + [f"--xla_force_host_platform_device_count={devices}", _CPU_XLA_FLAGS])
    sys.stdout.flush()
    return subprocess.call([sys.executable, "-m", "k2jax.plan", *argv], env=env)


def load_config(name: str):
    """A preset by name, or a config.json / model directory; `UserError` naming `--config`."""
    from k2jax.cli import UserError
    from k2jax.config import ConfigError, ModelConfig
    from k2jax.presets import PRESETS

    if name in PRESETS:
        return ModelConfig.preset(name)
    if not os.path.exists(name):
        raise UserError(f"--config {name}: no such file or directory (and not a preset: "
                        f"{', '.join(sorted(PRESETS))})")
    path = os.path.join(name, "config.json") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        raise UserError(f"--config {name}: no config.json in this directory")
    try:
        return ModelConfig.from_hf(path)
    except ConfigError as e:
        reason = str(e).removeprefix(f"{path}: ")
        raise UserError(f"--config {name}: {reason}") from None
    except OSError as e:
        raise UserError(f"--config {name}: {e.strerror or e}") from None


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


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _serve_step(config, mesh, batch, seq, prefill):
    import jax
    import jax.numpy as jnp

    import k2jax
    from k2jax import sharding

    params = _abstract(k2jax.param_shapes(config), sharding.param_shardings(config, mesh))
    cache = jax.eval_shape(lambda: k2jax.init_cache(config, batch, seq))
    cache = _abstract(cache, sharding.cache_shardings(cache, mesh))
    steps = seq if prefill else 1
    tokens = jax.ShapeDtypeStruct((batch, steps), jnp.int32,
                                  sharding=sharding.batch_sharding(mesh, (batch, steps)))

    def step(params, tokens_bt, positions_bt, cache):
        logits_btv, cache = k2jax.forward_cached(config, params, tokens_bt, positions_bt, cache)
        return logits_btv[:, -1], cache

    fn = jax.jit(step, donate_argnums=3)
    return fn, (params, tokens, tokens, cache), {"params": params, "cache": cache,
                                                 "inputs": (tokens, tokens)}


def _train_step(config, mesh, batch, seq, remat):
    import jax
    import jax.numpy as jnp
    import optax

    import k2jax
    from k2jax import sharding
    from k2jax.model import Transformer

    # Training keeps float32 master weights (QAT fake-quantizes them in the forward), so the
    # INT4 groups are planned as floats.
    config = config.replace(quantized_linears=())
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          k2jax.param_shapes(config))
    shardings = sharding.param_shardings(config, mesh, shapes)
    params = _abstract(shapes, shardings)
    tx = optax.adamw(1e-5, weight_decay=0.1)
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_state = _abstract(opt_shapes, sharding.optimizer_shardings(opt_shapes, shardings, mesh))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32,
                                  sharding=sharding.batch_sharding(mesh, (batch, seq)))
    model = Transformer(config, remat_policy=None if remat == "none" else remat)

    def loss_fn(params, tokens_bt):
        logits_btv, _, _ = model.apply({"params": params}, tokens_bt)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits_btv[:, :-1], tokens_bt[:, 1:]).mean()

    def step(params, opt_state, tokens_bt):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens_bt)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    fn = jax.jit(step, donate_argnums=(0, 1))
    return fn, (params, opt_state, tokens), {"params": params, "optimizer": opt_state,
                                             "inputs": tokens}


def plan(config, mesh_shape, *, mode="serve", batch=8, seq=4096, prefill=False,
         remat="nothing_saveable", dispatch="auto", capacity_factor=None, hbm_gib=None) -> dict:
    """Compiles one step of `config` on a mesh of `mesh_shape` over the available devices and
    returns the report (see the module docstring); sizes are bytes."""
    import jax

    from k2jax import expert_parallel, sharding

    mesh = sharding.make_mesh(mesh_shape)
    start = time.perf_counter()
    with sharding.activate(mesh), expert_parallel.settings(dispatch, capacity_factor):
        if mode == "serve":
            fn, args, parts = _serve_step(config, mesh, batch, seq, prefill)
        else:
            fn, args, parts = _train_step(config, mesh, batch, seq, remat)
        compiled = fn.lower(*args).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    per_device = {name: tree_bytes(tree, per_device=True) for name, tree in parts.items()}
    per_device["activations"] = int(stats.temp_size_in_bytes)
    per_device["outputs"] = int(stats.output_size_in_bytes - stats.alias_size_in_bytes)
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
    per_device["total"] = int(total)
    report = {
        "mesh": {a: n for a, n in zip(mesh.axis_names, mesh.axis_sizes)},
        "devices": mesh.size,
        "platform": jax.devices()[0].platform,
        "mode": mode,
        "step": "train" if mode == "train" else "prefill" if prefill else "decode",
        "batch": batch,
        "seq": seq,
        "expert_parallel_axes": list(expert_parallel.expert_axes(mesh, config.n_routed_experts)),
        "dispatch": expert_parallel.resolve_impl(dispatch),
        "capacity_factor": capacity_factor,
        "param_bytes_total": tree_bytes(parts["params"], per_device=False),
        "per_device_bytes": per_device,
        "compiled_bytes": {"arguments": int(stats.argument_size_in_bytes),
                           "outputs": int(stats.output_size_in_bytes),
                           "aliased": int(stats.alias_size_in_bytes),
                           "temporaries": int(stats.temp_size_in_bytes)},
        "collective_bytes_per_step": collective_bytes(compiled.as_text()),
        "compile_seconds": round(seconds, 1),
    }
    if hbm_gib is not None:
        report["hbm_bytes"] = int(hbm_gib * 2**30)
        report["fits"] = total <= report["hbm_bytes"]
    return report


# ---- collectives in the compiled HLO ------------------------------------------------------

_DTYPE_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "f8e4m3fn": 8, "f8e5m2": 8,
               "bf16": 16, "f16": 16, "s16": 16, "u16": 16, "f32": 32, "s32": 32, "u32": 32,
               "f64": 64, "s64": 64, "u64": 64, "c64": 64, "c128": 128}
_SHAPE = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_CALLEES = re.compile(r"\b(?:body|condition|calls|to_apply|branch_computations)="
                      r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape_bytes(text: str) -> float:
    """Bytes of an HLO shape string (a tuple's elements summed; layouts ignored)."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BITS.get(dt, 32) / 8
               for dt, dims in _SHAPE.findall(text) if dt in _DTYPE_BITS)


def collective_bytes(hlo: str) -> dict[str, int]:
    """Per-device operand bytes of each collective kind for one execution of the module.

    A collective inside a loop body counts once per iteration (XLA's known trip count), so the
    layer scan's all-to-alls count once per layer.
    """
    shapes, calls, entry, ops, computation = {}, {}, None, [], None
    for line in hlo.splitlines():
        if not line.startswith((" ", "\t")):
            match = _COMPUTATION.match(line)
            if match:
                computation = match.group(1)
                calls.setdefault(computation, [])
                if line.startswith("ENTRY"):
                    entry = computation
            continue
        match = _INSTRUCTION.match(line)
        if not match or computation is None:
            continue
        name, shape, opcode, rest = match.groups()
        shapes[name] = shape
        trips = _TRIP_COUNT.search(rest)
        for group in _CALLEES.findall(rest):
            for callee in re.findall(r"%?([\w.\-]+)", group):
                calls[computation].append((callee, int(trips.group(1)) if trips and
                                           opcode == "while" else 1))
        kind = opcode.removesuffix("-start")
        if kind in COLLECTIVES:
            operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            ops.append((computation, kind, operands))

    times: dict[str, int] = {}

    def visit(computation, count):
        times[computation] = times.get(computation, 0) + count
        for callee, factor in calls.get(computation, []):
            visit(callee, count * factor)

    if entry is not None:
        visit(entry, 1)
    totals = {kind: 0 for kind in COLLECTIVES}
    for computation, kind, operands in ops:
        size = sum(_shape_bytes(shapes.get(o, "")) for o in operands)
        totals[kind] += int(size * times.get(computation, 0))
    return {k: v for k, v in totals.items() if v or k != "ragged-all-to-all"}


# ---- output ---------------------------------------------------------------------------------

def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_report(r: dict) -> str:
    mesh = ",".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1) or "single device"
    drops = ("dropless" if r["capacity_factor"] is None
             else f"capacity factor {r['capacity_factor']:g}")
    lines = [f"{r.get('config', 'model')}: {r['step']} step, batch {r['batch']} x seq {r['seq']}, "
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


def main(argv=None) -> int:
    """`python -m k2jax.plan ...` (the re-run child too): `k2jax plan ...`, errors and all."""
    from k2jax.cli import main as cli_main

    return cli_main(["plan", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
