"""Long-context prefill on `tiny`: the plain attention (`[T, T]` scores) vs blockwise attention.

    python benchmarks/long_context.py               # table; --write saves results/long_context.json
    python benchmarks/long_context.py --lengths 8192 16384

For each length T, one cache-less forward of `tiny` (float32, batch 1, random weights) over T
tokens, as training and the full forward run it, with each attention implementation:

  plain      `pallas_kernels.attention.reference`: the whole `[B, T, N, T]` float32 score matrix
  blockwise  `pallas_kernels.attention.blockwise`: 512 queries x 512 keys at a time with an
             online softmax, key blocks above the causal diagonal skipped

Peak memory is the compiled forward's temporaries plus its arguments and outputs
(`memory_analysis()`, no run needed); a forward whose peak exceeds `--memory-gib` (default: the
machine's available memory less 2 GiB) is not run and its time is left blank: that is the old
path's failure point. Time is the median of `--repeats` runs of the forward compiled ahead of
time. Each row is measured in this process, in order of length.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import sys
import time

import _results  # benchmarks/_results.py, beside this script

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 8.0


def measure(config, params, length: int, impl: str, memory_gib: float, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import k2jax
    from k2jax import attention as attention_module
    from pallas_kernels.attention import api

    tokens = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (1, length)),
                         jnp.int32)
    # The model calls `pallas_kernels.attention.attention`; for the plain row it is pointed at
    # the reference for this benchmark only.
    original = attention_module.attention
    attention_module.attention = functools.partial(api.attention, impl=impl)
    try:
        forward = jax.jit(lambda p, t: k2jax.logits(config, p, t))
        compiled = forward.lower(params, tokens).compile()
    finally:
        attention_module.attention = original
    stats = compiled.memory_analysis()
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
            + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    row = {"length": length, "impl": impl, "peak_bytes": int(peak),
           "temp_bytes": int(stats.temp_size_in_bytes), "seconds": None}
    if peak > memory_gib * 2**30:
        row["skipped"] = f"needs {peak / 2**30:.1f} GiB > {memory_gib:.1f} GiB"
        return row
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled(params, tokens).block_until_ready()
        times.append(time.perf_counter() - start)
    row["seconds"] = float(np.median(times))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="run a forward only if its peak fits in this (default: the "
                             "available memory less 2 GiB)")
    _results.add_arguments(parser, "long_context")
    args = parser.parse_args(argv)

    import jax

    import k2jax

    tiny = k2jax.ModelConfig.preset("tiny")
    # A context long enough for the longest row, YaRN stretched to match.
    context = max(max(args.lengths), tiny.max_position_embeddings)
    rope = dataclasses.replace(
        tiny.rope_scaling, factor=context / tiny.rope_scaling.original_max_position_embeddings)
    config = tiny.replace(dtype="float32", max_position_embeddings=context, rope_scaling=rope)
    params = k2jax.init_params(config, jax.random.key(0))
    memory_gib = args.memory_gib or _available_gib() - 2
    rows = []
    for length in args.lengths:
        for impl in ("reference", "blockwise"):
            row = measure(config, params, length, impl, memory_gib, args.repeats)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)

    print(f"\n`tiny` cache-less forward, float32, batch 1; {os.cpu_count()} CPU cores, "
          f"run if the peak fits {memory_gib:.1f} GiB")
    print(f"{'T':>7} {'plain peak GiB':>15} {'plain s':>9} {'blockwise peak GiB':>19} "
          f"{'blockwise s':>12} {'peak ratio':>11}")
    by = {(r["length"], r["impl"]): r for r in rows}
    for length in args.lengths:
        plain, blocks = by[(length, "reference")], by[(length, "blockwise")]

        def secs(r):
            return "too big" if r["seconds"] is None else f"{r['seconds']:.2f}"

        print(f"{length:>7} {plain['peak_bytes'] / 2**30:>15.2f} {secs(plain):>9} "
              f"{blocks['peak_bytes'] / 2**30:>19.3f} {secs(blocks):>12} "
              f"{plain['peak_bytes'] / blocks['peak_bytes']:>10.0f}x")
    _results.write(args, "long_context", {"preset": "tiny", "dtype": "float32",
                                          "memory_gib": memory_gib, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
