"""`k2jax plan`: compile a config against a mesh with no real arrays and report per-device memory.

The programs that really run are lowered with `jax.ShapeDtypeStruct` inputs that carry their
shardings, compiled ahead of time, and measured (`plan.report`). Serve: the generation engine's
own forward (one decode step, or a prefill chunk with `--prefill`) over its paged latent cache
and its sampler, the weights in the checkpoint layout that accelerators compute with. Train: the
step `k2jax train` runs (QAT forward and backward, the optimizer update on float32 master
weights, router balancing), with the run's shardings.

- parameters, optimizer state, cache (the page pool), sampler state and inputs per device, from
  their shardings (int4 counted packed, two per byte);
- activations: the compiled temporaries (`memory_analysis().temp_size_in_bytes`; serve: the
  larger of the forward's and the sampler's);
- total: what is live at the peak, the persistent parts plus the larger program's arguments,
  outputs and temporaries;
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
import os
import subprocess
import sys

from plan.report import format_report, plan

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
                        help="serve: plan a prefill chunk (--prefill-chunk tokens per row, with "
                             "a cache of --seq) instead of one decode step")
    parser.add_argument("--prefill-chunk", type=int, default=256,
                        help="serve: prompt tokens per row per prefill step (the engine's "
                             "prefill_chunk; default 256)")
    parser.add_argument("--cache-dtype", default=None,
                        help="serve: latent cache dtype (default: the model's; e.g. "
                             "float8_e4m3fn)")
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
    from cli import UserError

    # Both are checked here, before a child process spends seconds starting JAX.
    config = load_config(args.config)
    try:
        devices = sharding.device_count(args.mesh)
        sharding.check_mesh(config, args.mesh)
    except sharding.MeshError as e:
        raise UserError(f"--mesh {args.mesh}: {e.reason}") from None
    if not args.native and not os.environ.get(_CHILD_ENV):
        return _rerun_with_cpu_devices(args, devices)
    report = plan(config, args.mesh, mode=args.mode, batch=args.batch, seq=args.seq,
                  prefill_chunk=args.prefill_chunk if args.prefill else None,
                  cache_dtype=args.cache_dtype, remat=args.remat, dispatch=args.dispatch,
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
    return subprocess.call([sys.executable, "-m", "plan.cli", *argv], env=env)


def load_config(name: str):
    """A preset by name, or a config.json / model directory; `UserError` naming `--config`."""
    from cli import UserError
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


def main(argv=None) -> int:
    """`python -m plan.cli ...` (the re-run child too): `k2jax plan ...`, errors and all."""
    from cli import main as cli_main

    return cli_main(["plan", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
