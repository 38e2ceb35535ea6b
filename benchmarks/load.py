"""Loading a converted checkpoint onto a device mesh: bytes read, bytes per device, peak host RSS.

    python benchmarks/load.py                 # table; --write saves results/load.json
    python benchmarks/load.py --mesh expert=4,tensor=2 --experts 32

The checkpoint is Kimi K2 Thinking at its real widths (hidden 7168, 64 heads, q/kv lora 1536/512,
expert ffn 2048, INT4 routed experts) with fewer layers, experts and vocabulary and a narrower
dense ffn: random hub safetensors written by `benchmarks/convert.py`'s generator, then
`k2jax convert` to Orbax (one chunk per layer and expert). Each row runs in its own process with
`--mesh`'s device count simulated on CPU (so peak RSS is that row's), in this order:

  raw read         read every file of `params/` start to end (64 MiB reads): the I/O floor
  one device       `k2jax.load(path)`: every leaf onto the first device
  onto mesh        `k2jax.load(path, mesh)`: each device's shards read from their own chunks
  host then place  the obvious alternative: the whole tree restored into host numpy arrays
                   (Orbax, `restore_type=np.ndarray`), then `jax.device_put` onto the mesh's
                   shardings

  read             bytes the process read from files during the step (`rchar` of
                   /proc/self/io; the source is in the page cache, so this counts what the
                   loader asked for, not disk traffic), over the checkpoint's on-disk size
  placed           the bytes the devices hold afterwards: per device (largest / smallest) and
                   all devices together (replicated leaves count once per device)
  host extra       peak RSS - RSS before the step - the device buffers' bytes: what the loader
                   held beyond the arrays it produced. On CPU, device memory is host memory,
                   so the buffers show up in RSS (XLA:CPU keeps int4 a value per byte); on
                   accelerators they do not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import _results  # benchmarks/_results.py, beside this script

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STEPS = ("raw read", "one device", "onto mesh", "host then place")


def _convert_benchmark():
    """`benchmarks/convert.py` as a module (its name would shadow the `convert` package)."""
    spec = importlib.util.spec_from_file_location(
        "convert_benchmark", pathlib.Path(__file__).with_name("convert.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _proc_value(file: str, key: str) -> int:
    """A counter from /proc/self/{io,status}: `rchar` in bytes, `VmRSS` / `VmHWM` in kB."""
    with open(f"/proc/self/{file}") as f:
        for line in f:
            if line.startswith(key + ":"):
                value = int(line.split()[1])
                return value * 1024 if file == "status" else value
    raise KeyError(key)


def _leaf_bytes(shape, dtype) -> float:
    import jax.numpy as jnp

    bits = 4 if jnp.dtype(dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) \
        else 8 * jnp.dtype(dtype).itemsize
    return math.prod(shape) * bits / 8


def _per_device_bytes(params) -> tuple[dict[str, float], int]:
    """`({device: logical bytes}, buffer bytes of all devices)`: logical counts int4 packed, two
    per byte, as accelerators store it; XLA:CPU's buffers hold one int4 value per byte."""
    import jax

    placed: dict[str, float] = {}
    buffers = 0
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            key = str(shard.device)
            placed[key] = placed.get(key, 0) + _leaf_bytes(shard.data.shape, leaf.dtype)
            buffers += shard.data.on_device_size_in_bytes()
    return placed, buffers


def child(step: str, path: str, mesh_spec: str) -> None:
    """Runs one step and prints its measurements as JSON on the last line."""
    import jax

    import k2jax
    from k2jax import checkpoint, param_sharding, sharding

    mesh = sharding.make_mesh(mesh_spec)
    rss_before, read_before = _proc_value("status", "VmRSS"), _proc_value("io", "rchar")
    start = time.perf_counter()
    params = None
    if step == "raw read":
        buf = bytearray(64 << 20)
        for directory, _, files in os.walk(os.path.join(path, checkpoint.PARAMS_DIR)):
            for file in files:
                with open(os.path.join(directory, file), "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass
    elif step == "one device":
        _, params = k2jax.load(path)
    elif step == "onto mesh":
        _, params = k2jax.load(path, mesh)
    elif step == "host then place":
        import numpy as np
        import orbax.checkpoint as ocp

        config = checkpoint.read_config(path)
        abstract = k2jax.param_shapes(config)
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            whole = ckptr.restore(os.path.join(path, checkpoint.PARAMS_DIR),
                                  args=ocp.args.PyTreeRestore(item=abstract,
                                                              restore_args=as_numpy))
        params = jax.device_put(whole, param_sharding.param_shardings(config, mesh))
        jax.block_until_ready(params)
        del whole
    if params is not None:
        jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    placed, buffers = _per_device_bytes(params) if params is not None else ({}, 0)
    print(json.dumps({
        "seconds": seconds,
        "read_bytes": _proc_value("io", "rchar") - read_before,
        "rss_before": rss_before, "rss_peak": _proc_value("status", "VmHWM"),
        "placed_per_device": placed, "buffer_bytes": buffers}))


def run_step(step: str, path: str, mesh_spec: str, devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(
        [f for f in env.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
        + [f"--xla_force_host_platform_device_count={devices}"])
    out = subprocess.run([sys.executable, __file__, "--child", step, path, mesh_spec],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{step} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    placed = list(result.pop("placed_per_device").values())
    result.update(placed_total=sum(placed), placed_max=max(placed, default=0),
                  placed_min=min(placed, default=0), devices_used=len(placed))
    result["host_extra"] = result["rss_peak"] - result["rss_before"] - result["buffer_bytes"]
    return result


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("STEP", "PATH", "MESH"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--mesh", default="expert=8")
    parser.add_argument("--moe-layers", type=int, default=1)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dense-ffn", type=int, default=4096,
                        help="dense-layer ffn width (K2: 18432; narrower keeps the replicated "
                             "copies of an 8-device CPU mesh within this machine's memory)")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (removed)")
    _results.add_arguments(parser, "load")
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0

    from convert.to_orbax import convert_to_orbax
    from k2jax import checkpoint, sharding

    devices = sharding.device_count(args.mesh)
    config = _convert_benchmark().bench_config(args.moe_layers, args.experts, args.vocab)
    config = config.replace(intermediate_size=args.dense_ffn)
    work = tempfile.mkdtemp(prefix="k2jax-load-", dir=args.workdir)
    try:
        source, converted = os.path.join(work, "hub"), os.path.join(work, "orbax")
        print(f"writing a {args.moe_layers + 1}-layer, {args.experts}-expert K2-width hub "
              f"checkpoint and converting it ...", file=sys.stderr, flush=True)
        _convert_benchmark().build_source(source, config)
        convert_to_orbax(source, converted, progress=False, log=lambda _: None)
        shutil.rmtree(source)
        on_disk = _dir_bytes(os.path.join(converted, checkpoint.PARAMS_DIR))
        rows = {}
        for step in STEPS:
            rows[step] = run_step(step, converted, args.mesh, devices)
            print(f"{step}: {json.dumps(rows[step])}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, config, on_disk, devices, rows)
    _results.write(args, "load", {
        "mesh": args.mesh, "devices": devices, "moe_layers": args.moe_layers,
        "experts": args.experts, "vocab": args.vocab, "dense_ffn": args.dense_ffn,
        "checkpoint_bytes_on_disk": on_disk, "rows": rows})
    return 0


def report(args, config, on_disk: int, devices: int, rows: dict) -> None:
    gb = 1e9
    print(f"\nK2 widths, {args.moe_layers} MoE layer(s) x {args.experts} INT4 experts + 1 dense "
          f"(ffn {args.dense_ffn}), vocab {args.vocab}: checkpoint {on_disk / gb:.2f} GB on "
          f"disk; mesh {args.mesh} ({devices} simulated CPU devices), {os.cpu_count()} cores")
    print(f"{'step':<16} {'s':>6} {'read GB':>8} {'read/ckpt':>10} {'per device GB':>14} "
          f"{'all devices GB':>15} {'peak RSS GB':>12} {'host extra GB':>14}")
    for step, r in rows.items():
        per_device = (f"{r['placed_max'] / gb:.2f}/{r['placed_min'] / gb:.2f}"
                      if r["devices_used"] else "-")
        print(f"{step:<16} {r['seconds']:>6.1f} {r['read_bytes'] / gb:>8.2f} "
              f"{r['read_bytes'] / on_disk:>10.2f} {per_device:>14} "
              f"{r['placed_total'] / gb:>15.2f} {r['rss_peak'] / gb:>12.2f} "
              f"{max(r['host_extra'], 0) / gb:>14.2f}")
    print("per device: largest/smallest, int4 packed; host extra: peak RSS beyond the RSS "
          "before the step and the device buffers")


if __name__ == "__main__":
    sys.exit(main())
