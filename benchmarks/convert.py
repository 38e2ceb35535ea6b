"""Checkpoint conversion speed and memory on a synthetic K2-shaped hub checkpoint.

    python benchmarks/convert.py                # prints a table; --write saves results/convert.json
    python benchmarks/convert.py --moe-layers 1 --experts 8   # a smaller run

The source is Kimi K2 Thinking at its real widths (hidden 7168, 64 heads, q/kv lora 1536/512,
dense ffn 18432, expert ffn 2048, INT4 routed experts with K2 Thinking's quantization_config) but
with fewer layers, experts and vocabulary: ~3.3 GB by default, written in hub format with an
index, one shard per layer. Each row runs in its own process (so peak RSS is that step's), in
this order, on the same files:

  raw read     read every shard file start to end (64 MiB reads): the I/O floor
  in-memory    the obvious alternative: every tensor read and transformed into one in-memory
               tree, then `k2jax.checkpoint.save` (Orbax)
  convert      `convert_to_orbax`: streaming, per layer / per expert, resumable
  export       `convert_to_hf`: the converted checkpoint back to hub safetensors

Times are wall clock (and CPU seconds, all threads) with the source in the page cache (it was
just written); GB/s is source bytes per second. `RSS base` is the process after imports,
`RSS peak` its maximum. The in-memory row is skipped when free memory is short of ~4x the
source.
Everything is written under --workdir and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import _results  # benchmarks/_results.py, beside this script

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The in-memory alternative holds every INT4 value in a byte, plus one leaf stacked twice.
IN_MEMORY_FACTOR = 4
sys.path.insert(0, str(ROOT))


def bench_config(moe_layers: int, experts: int, vocab: int):
    from k2jax.config import ModelConfig

    return ModelConfig.preset("kimi-k2-thinking").replace(
        vocab_size=vocab, num_hidden_layers=1 + moe_layers, n_routed_experts=experts,
        num_experts_per_tok=min(8, experts))


def build_source(directory: str, config) -> int:
    """Writes random hub tensors for `config` (one shard per unit); returns total bytes."""
    import torch
    from safetensors.torch import save_file

    from convert import hf_layout
    from convert.reader import DTYPES
    from convert.to_hf import hub_config

    torch_dtypes = {"BF16": torch.bfloat16, "F32": torch.float32, "I32": torch.int32,
                    "I64": torch.int64}
    os.makedirs(directory)
    units = hf_layout.plan(config, config)
    weight_map, total = {}, 0
    for n, unit in enumerate(units, 1):
        file = f"model-{n:05d}-of-{len(units):05d}.safetensors"
        tensors = {}
        for item in unit.items:
            for name, (shape, dtype) in hf_layout.export_specs(item).items():
                if name.endswith("weight_shape"):
                    t = torch.tensor(_linear_shape(item), dtype=torch.int64)
                elif dtype == "I32":
                    t = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32)
                elif name.endswith("weight_scale"):
                    t = (torch.rand(shape) * 1e-3 + 1e-4).to(torch_dtypes[dtype])
                else:
                    t = (torch.randn(shape) * 0.02).to(torch_dtypes[dtype])
                tensors[name] = t
                total += t.numel() * DTYPES[dtype].itemsize
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hub_config(config), f, indent=2)
    return total


def _linear_shape(item) -> list[int]:
    din, dout = item.target.values.shape
    return [dout, din]


# ---- the measured steps, each run in a child process -----------------------------------------

def step_raw_read(src: str, _: str) -> None:
    buf = bytearray(64 << 20)
    for file in sorted(os.listdir(src)):
        if file.endswith(".safetensors"):
            with open(os.path.join(src, file), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def step_in_memory(src: str, dst: str) -> None:
    import numpy as np

    from convert import hf_layout
    from convert.reader import HFCheckpoint
    from k2jax import checkpoint, quant
    from k2jax.config import ModelConfig

    with HFCheckpoint(src) as hf:
        config = ModelConfig.from_hf(hf.config)
        leaves: dict = {}
        for unit in hf_layout.plan(config, config):
            for item in unit.items:
                leaves.setdefault(item.leaf, []).append(hf_layout.from_hub(item, hf.read))
    tree: dict = {}
    for leaf in list(leaves):
        values = leaves.pop(leaf)  # stacked leaf by leaf, so at most one leaf is held twice
        lead = _index_shape(config, leaf)

        def stack(arrays):
            return np.stack(arrays).reshape(lead + arrays[0].shape) if lead else arrays[0]

        if isinstance(values[0], quant.QuantizedWeight):
            value = quant.QuantizedWeight(stack([v.values for v in values]),
                                          stack([v.scale for v in values]))
        else:
            value = stack(values)
        del values
        node = tree
        for key in leaf[:-1]:
            node = node.setdefault(key, {})
        node[leaf[-1]] = value
    checkpoint.save(dst, config, tree)


def _index_shape(config, leaf) -> tuple[int, ...]:
    if leaf[0] == "dense_layers":
        return (config.num_dense_layers,)
    if leaf[0] == "moe_layers":
        return (config.num_moe_layers,) + ((config.n_routed_experts,) if "experts" in leaf
                                           else ())
    return ()


def step_convert(src: str, dst: str) -> None:
    from convert.to_orbax import convert_to_orbax

    convert_to_orbax(src, dst, progress=False)


def step_export(src: str, dst: str) -> None:
    from convert.to_hf import convert_to_hf

    convert_to_hf(src, dst, progress=False)


STEPS = {"raw read": step_raw_read, "in-memory": step_in_memory, "convert": step_convert,
         "export": step_export}


def child(step: str, src: str, dst: str) -> None:
    """Imports what the step needs, then times it; prints one JSON line."""
    import jax  # noqa: F401  (the base RSS includes the libraries every step but raw read uses)

    import convert.to_orbax  # noqa: F401
    import k2jax.checkpoint  # noqa: F401

    base = _status_bytes("VmRSS")
    cpu0 = _cpu_seconds()
    # Linux carries ru_maxrss across exec, so the peak is read from VmHWM, reset here.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    STEPS[step](src, dst)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "cpu_seconds": _cpu_seconds() - cpu0,
                      "rss_base": base, "rss_peak": _status_bytes("VmHWM")}))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def run_step(step: str, src: str, dst: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, "--child", step, src, dst], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--moe-layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--child", nargs=3, metavar=("STEP", "SRC", "DST"),
                        help=argparse.SUPPRESS)
    _results.add_arguments(parser, "convert")
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    config = bench_config(args.moe_layers, args.experts, args.vocab)
    work = tempfile.mkdtemp(prefix="k2jax-convert-bench-", dir=args.workdir)
    try:
        src = os.path.join(work, "hub")
        source_bytes = build_source(src, config)
        rows = {}
        for step, inp, out in (("raw read", src, ""), ("in-memory", src, "in_memory"),
                               ("convert", src, "converted"),
                               ("export", os.path.join(work, "converted"), "exported")):
            free = _available_memory()
            if step == "in-memory" and free < IN_MEMORY_FACTOR * source_bytes:
                print(f"in-memory: skipped, needs ~{IN_MEMORY_FACTOR}x the source's "
                      f"{source_bytes / 1e9:.1f} GB of memory, {free / 1e9:.1f} GB available")
                continue
            rows[step] = run_step(step, inp, os.path.join(work, out) if out else "")
            rows[step]["output_bytes"] = _size(os.path.join(work, out)) if out else 0
            if step == "in-memory":
                shutil.rmtree(os.path.join(work, out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, config, source_bytes, rows)


def report(args, config, source_bytes: int, rows: dict) -> None:
    import platform

    gb = 1e9
    print(f"source: {source_bytes / gb:.2f} GB, K2 Thinking widths, {config.num_hidden_layers} "
          f"layers ({config.num_moe_layers} MoE x {config.n_routed_experts} INT4 experts), "
          f"vocab {config.vocab_size}; {os.cpu_count()} CPUs, {platform.machine()}")
    print(f"{'step':<11} {'seconds':>8} {'CPU s':>7} {'GB/s':>6} {'RSS base':>9} "
          f"{'RSS peak':>9} {'output':>8}")
    for step, r in rows.items():
        print(f"{step:<11} {r['seconds']:8.1f} {r['cpu_seconds']:7.1f} "
              f"{source_bytes / r['seconds'] / gb:6.2f} {r['rss_base'] / gb:8.2f}G "
              f"{r['rss_peak'] / gb:8.2f}G {r['output_bytes'] / gb:7.2f}G")
    _results.write(args, "convert", {
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, page-cache-warm files",
        "source_bytes": source_bytes,
        "config": {"num_hidden_layers": config.num_hidden_layers,
                   "n_routed_experts": config.n_routed_experts,
                   "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
                   "quantized_linears": list(config.quantized_linears)},
        "rows": rows})


if __name__ == "__main__":
    main()
