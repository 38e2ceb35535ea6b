"""INT4 matmul speed at Kimi K2 expert shapes: bf16 dot vs XLA dequant+dot vs the Pallas kernels.

    python benchmarks/int4_matmul.py     # prints a table; --write saves results/int4_matmul.json

Dense cases: `x [M, K] @ W [K, N]` for the expert gate/up (7168x2048) and down (2048x7168)
projections. Grouped case: expert-sorted rows (top-8 routing over E experts) through
per-expert weights `[E, K, N]`. Columns, all in one run on one device:
  bf16      `jnp.dot` / `lax.ragged_dot` on a bf16 weight (what INT4 replaces)
  xla_int4  the XLA reference: dequantize the whole weight, then the same dot
  pallas    this repo's kernel (GPU/TPU only; Triton on GPU, Mosaic on TPU)
  tokamax   tokamax's `ragged_dot` on a `QuantizedArray` (where tokamax imports)
  roofline  weight bytes / measured copy bandwidth, for int4 (4.5 bits) and bf16
On CPU there is no kernel to run, M stops at 512, the grouped case uses 8 experts and 64 rows,
and each time is the median of a few repetitions; the table says so.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _results  # benchmarks/_results.py, beside this script

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import dequantize
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.grouped_matmul import reference as grouped_reference
from pallas_kernels.int4_matmul import int4_matmul
from pallas_kernels.quantized import QuantizedWeight

try:
    import tokamax
except ImportError:
    tokamax = None

SHAPES = {"gate/up 7168x2048": (7168, 2048), "down 2048x7168": (2048, 7168)}
GROUP = 32
TOP_K = 8


def time_us(fn, *args, reps: int) -> float:
    """Median wall time of the jitted `fn(*args)` in microseconds, after one warm-up call."""
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def copy_bandwidth(num_bytes: int, reps: int) -> float:
    """Bytes per second of an elementwise pass (one read + one write) over `num_bytes`.

    The buffer is donated so each pass runs in place: a fresh output per call would time the
    host's page faults on CPU rather than memory traffic.
    """
    step = jax.jit(lambda a: a + 1, donate_argnums=0)
    a = jax.block_until_ready(step(jnp.zeros((num_bytes // 4,), jnp.float32)))
    times = []
    for _ in range(reps + 2):
        start = time.perf_counter()
        a = jax.block_until_ready(step(a))
        times.append(time.perf_counter() - start)
    return 2 * num_bytes / statistics.median(times)


def weight_bytes(k: int, n: int, experts: int = 1) -> dict[str, int]:
    """HBM bytes of the weight: int4 values + bf16 scales, or bf16."""
    return {"int4": experts * (k * n // 2 + (k // GROUP) * n * 2), "bf16": experts * k * n * 2}


def random_weights(key, shape_kn):
    kv, ks = jax.random.split(key)
    values = jax.random.randint(kv, shape_kn, -8, 8).astype(jnp.int4)
    *lead, k, n = shape_kn
    scale = (jax.random.uniform(ks, (*lead, k // GROUP, n)) * 0.01).astype(jnp.bfloat16)
    return values, scale


def tokamax_call(x, values, scale, group_sizes):
    """tokamax's ragged dot on its own quantized-array type (scales per 32 rows of K)."""
    rhs = tokamax.QuantizedArray(values, scale)
    return tokamax.ragged_dot(x, rhs, group_sizes, preferred_element_type=x.dtype)


def measure(methods: dict, args: tuple, reps: int) -> dict[str, float | str]:
    """Times every method; one that fails records its error instead of stopping the run."""
    times = {}
    for name, fn in methods.items():
        try:
            times[name] = round(time_us(fn, *args, reps=reps), 1)
        except Exception as err:  # report and go on: a peer library may not support a shape
            times[name] = f"error: {type(err).__name__}: {str(err)[:120]}"
    return times


def dense_rows(ms, reps, accelerator, bandwidth, shapes=SHAPES):
    rows = []
    for label, (k, n) in shapes.items():
        values, scale = random_weights(jax.random.key(0), (k, n))
        w_bf16 = dequantize(values, scale, jnp.bfloat16)
        for m in ms:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            methods = {"bf16": lambda x, v, s, w=w_bf16: jnp.dot(x, w),
                       "xla_int4": lambda x, v, s: int4_matmul(x, v, s, impl="reference")}
            if accelerator:
                methods["pallas"] = lambda x, v, s: int4_matmul(x, v, s, impl="pallas")
            if tokamax is not None:
                methods["tokamax"] = lambda x, v, s: tokamax_call(
                    x, v[None], s[None], jnp.array([x.shape[0]], jnp.int32))
            rows.append(_row("dense " + label, m, k, n, 1, measure(methods, (x, values, scale),
                                                                    reps), bandwidth))
    return rows


def grouped_rows(tokens_list, experts, reps, accelerator, bandwidth, shapes=SHAPES):
    rows = []
    rng = np.random.default_rng(0)
    for label, (k, n) in shapes.items():
        values, scale = random_weights(jax.random.key(1), (experts, k, n))
        w_bf16 = dequantize(values, scale, jnp.bfloat16)
        for tokens in tokens_list:
            m = tokens * TOP_K
            # Each token picks TOP_K distinct experts at random: the sizes a router produces.
            picks = np.stack([rng.choice(experts, TOP_K, replace=False) for _ in range(tokens)])
            sizes = jnp.asarray(np.bincount(picks.ravel(), minlength=experts), jnp.int32)
            x = jax.random.normal(jax.random.key(tokens), (m, k), jnp.bfloat16)
            methods = {
                "bf16": lambda x, v, s, g, w=w_bf16: jax.lax.ragged_dot(x, w, g),
                "xla_int4": lambda x, v, s, g: grouped_reference.grouped_int4_matmul(x, v, s, g),
            }
            if accelerator:
                methods["pallas"] = lambda x, v, s, g: grouped_matmul(
                    x, QuantizedWeight(v, s), g, impl="pallas")
            if tokamax is not None:
                methods["tokamax"] = tokamax_call
            # The kernels read only the experts some token is routed to.
            hit = int(np.count_nonzero(np.asarray(sizes)))
            rows.append(_row(f"grouped E={experts} {label}", m, k, n, hit,
                             measure(methods, (x, values, scale, sizes), reps), bandwidth))
    return rows


def _row(case, m, k, n, experts, times, bandwidth):
    nbytes = weight_bytes(k, n, experts)
    return {"case": case, "M": m, "K": k, "N": n, "experts_hit": experts, "times_us": times,
            "roofline_us": {name: round(b / bandwidth * 1e6, 1) for name, b in nbytes.items()}}


def _cell(t):
    """A time, "err" (the error is printed below the table) or "-" (not run)."""
    if isinstance(t, float):
        return f"{t:>10.1f}"
    return f"{'err' if t else '-':>10}"


def print_table(result):
    methods = ["bf16", "xla_int4", "pallas", "tokamax"]
    header = f"{'case':<30} {'M':>5} " + " ".join(f"{m:>10}" for m in methods)
    header += f" {'roof int4':>10} {'roof bf16':>10}"
    print(f"device: {result['device']}  jax {result['jax']}  "
          f"copy bandwidth {result['copy_bandwidth_GBps']:.1f} GB/s  (times in us, median)")
    for note in result["notes"]:
        print("note:", note)
    print(header)
    for row in result["rows"]:
        cells = [_cell(row["times_us"].get(name)) for name in methods]
        print(f"{row['case']:<30} {row['M']:>5} " + " ".join(cells)
              + f" {row['roofline_us']['int4']:>10.1f} {row['roofline_us']['bf16']:>10.1f}")
    for row in result["rows"]:
        for name, t in row["times_us"].items():
            if isinstance(t, str):
                print(f"{row['case']} M={row['M']} {name}: {t}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, help="repetitions per timing (default 20, CPU 3)")
    _results.add_arguments(parser, "int4_matmul")
    args = parser.parse_args()

    backend = jax.default_backend()
    accelerator = backend in ("gpu", "tpu")
    reps = args.reps or (20 if accelerator else 3)
    notes = [f"Pallas kernels run on {backend}" if accelerator else
             "CPU: no Pallas kernel (XLA paths only); M up to 512; grouped case 8 experts, "
             "8 tokens x top-8"]
    if tokamax is None:
        notes.append("tokamax is not installed: no tokamax column")
    ms = [1, 8, 64, 512, 4096] if accelerator else [1, 8, 64, 512]
    experts, tokens = (384, [8, 64, 512]) if accelerator else (8, [8])
    bandwidth = copy_bandwidth(1 << 30 if accelerator else 1 << 27, reps)
    result = {
        "device": str(jax.devices()[0].device_kind), "backend": backend, "jax": jax.__version__,
        "reps": reps, "copy_bandwidth_GBps": bandwidth / 1e9, "notes": notes,
        "rows": dense_rows(ms, reps, accelerator, bandwidth)
                + grouped_rows(tokens, experts, reps, accelerator, bandwidth),
    }
    print_table(result)
    _results.write(args, "int4_matmul", result, indent=1)


if __name__ == "__main__":
    main()
