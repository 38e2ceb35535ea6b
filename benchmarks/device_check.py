"""One-command accelerator check of the kernels: accuracy, speed at Kimi K2 shapes, a decode step.

    python -m benchmarks.device_check                   # GPU/TPU: every section (minutes)
    python -m benchmarks.device_check --json out.json   # also save the results
    python -m benchmarks.device_check --lower-only      # any host: lowering only

Without an accelerator (CPU, CI) it lowers every kernel for `cuda` (Triton) and `tpu` (Mosaic)
at K2 shapes and checks that the kernel's custom call is in the module, so the kernels and this
script cannot rot where no accelerator is at hand. `--execute` runs the device sections on CPU
as well, at small shapes with the kernels in interpret mode: a smoke test, not a measurement.

Sections on an accelerator, all in one run on one device:
  accuracy  each compiled kernel against its XLA reference: max |kernel - reference| over
            max |reference|
  int4      x [M, K] @ INT4 W [K, N] at K2's expert shapes (7168x2048, 2048x7168), M = 1..512:
            bf16 dot, XLA dequantize-then-dot, the Pallas kernel (tokamax where it imports)
  grouped   top-8 of 384 experts, 1..64 tokens: bf16 ragged_dot, XLA dequantize-then-ragged_dot,
            the Pallas kernel (tokamax where it imports)
  routing   the fused router kernel against XLA's top_k reference, 1..4096 tokens, 384 experts
  decode    one decode step of `small` with INT4 routed experts, batch 1 and 8
Times are medians in microseconds. `% roof`, for each method on INT4 weights, is the time the
bytes the op must read would take at the device's HBM bandwidth (the INT4 weight; for the
grouped case only the experts routed to; for the decode step `benchmarks/generate.py`'s count)
as a share of the measured time.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # its sibling scripts

import _results  # noqa: E402
import int4_matmul as bench  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import lowering  # noqa: E402
from pallas_kernels.attention import api as attention_api  # noqa: E402
from pallas_kernels.attention.paged import paged_latent_attention  # noqa: E402
from pallas_kernels.grouped_matmul import grouped_matmul  # noqa: E402
from pallas_kernels.int4_matmul import int4_matmul  # noqa: E402
from pallas_kernels.quantized import QuantizedWeight  # noqa: E402
from pallas_kernels.topk_routing import route  # noqa: E402

# HBM bandwidth by device kind, bytes/s (vendor figures); the first substring that matches wins.
HBM_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H200", 4.8e12), ("H100", 3.35e12), ("H800", 3.35e12),
                 ("A100", 2.0e12), ("TPU v6", 1.64e12), ("TPU v5p", 2.76e12),
                 ("TPU v5", 0.819e12), ("TPU v4", 1.2e12))
TOP_K, GROUP = 8, 32


@dataclasses.dataclass(frozen=True)
class Case:
    """A kernel at one shape: `kernel(platform, interpret)` and `reference` both map the
    arrays of `make_args(key)` to the output; `make_args` traces, so lowering never allocates."""

    name: str
    kernel: Callable
    reference: Callable
    make_args: Callable


def _int4(key, shape_kn):
    kv, ks = jax.random.split(key)
    *lead, k, n = shape_kn
    values = jax.random.randint(kv, shape_kn, -8, 8).astype(jnp.int4)
    scale = (jax.random.uniform(ks, (*lead, k // GROUP, n), minval=0.5, maxval=1.5) * 0.02)
    return values, scale.astype(jnp.bfloat16)


def _normal(key, shape, dtype=jnp.bfloat16):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def int4_case(m, k, n):
    def make_args(key):
        kx, kw = jax.random.split(key)
        return (_normal(kx, (m, k)), *_int4(kw, (k, n)))

    return Case(f"int4_matmul {m}x{k}x{n}",
                lambda p, i: lambda x, v, s: int4_matmul(x, v, s, impl="pallas", platform=p,
                                                         interpret=i),
                lambda x, v, s: int4_matmul(x, v, s, impl="reference"), make_args)


def grouped_case(tokens, experts, k, n):
    def make_args(key):
        kx, kw, ke = jax.random.split(key, 3)
        picks = jax.random.randint(ke, (tokens * TOP_K,), 0, experts)
        sizes = jnp.bincount(picks, length=experts).astype(jnp.int32)
        return (_normal(kx, (tokens * TOP_K, k)), *_int4(kw, (experts, k, n)), sizes)

    return Case(f"grouped_matmul {tokens * TOP_K}x{k}x{n} E={experts}",
                lambda p, i: lambda x, v, s, g: grouped_matmul(
                    x, QuantizedWeight(v, s), g, impl="pallas", platform=p, interpret=i),
                lambda x, v, s, g: grouped_matmul(x, QuantizedWeight(v, s), g, impl="reference"),
                make_args)


def routing_case(tokens, experts, n_group=1, topk_group=1):
    params = dict(top_k=TOP_K, n_group=n_group, topk_group=topk_group,
                  routed_scaling_factor=2.827)

    def make_args(key):
        kl, kb = jax.random.split(key)
        return (jax.random.normal(kl, (tokens, experts)),
                0.1 * jax.random.normal(kb, (experts,)))

    def weights(fn):
        return lambda logits, bias: fn(logits, bias)[0]

    return Case(f"route T={tokens} E={experts} groups={n_group}/{topk_group}",
                lambda p, i: weights(lambda a, b: route(a, b, impl="pallas", platform=p,
                                                        interpret=i, **params)),
                weights(lambda a, b: route(a, b, impl="reference", **params)), make_args)


def attention_case(t, heads, k, u):
    def make_args(key):
        kq, kk, kv = jax.random.split(key, 3)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
        return (_normal(kq, (1, t, heads, k)), _normal(kk, (1, t, heads, k)),
                _normal(kv, (1, t, heads, u)), positions, positions)

    scale = k ** -0.5
    return Case(f"attention T={t} heads={heads} {k}/{u}",
                lambda p, i: lambda *a: attention_api.attention(*a, scale=scale, impl="pallas",
                                                                platform=p, interpret=i),
                lambda *a: attention_api.attention(*a, scale=scale, impl="blockwise"), make_args)


def paged_case(batch, heads, context, layers, page=64):
    pages_per_row = context // page

    def make_args(key):
        keys = jax.random.split(key, 4)
        pages = batch * pages_per_row
        table = jnp.arange(pages, dtype=jnp.int32).reshape(batch, pages_per_row)
        return (_normal(keys[0], (batch, 1, heads, 512)), _normal(keys[1], (batch, 1, heads, 64)),
                _normal(keys[2], (layers, pages, page, 512)),
                _normal(keys[3], (layers, pages, page, 64)), table, jnp.int32(layers - 1),
                jnp.full((batch, 1), context - 1, jnp.int32))

    return Case(f"paged attention B={batch} context={context}",
                lambda p, i: lambda *a: paged_latent_attention(*a, scale=0.1, impl="pallas",
                                                               platform=p, interpret=i),
                lambda *a: paged_latent_attention(*a, scale=0.1, impl="reference"), make_args)


def cases(small: bool) -> list[Case]:
    """Every kernel at K2 shapes (or, `small`, shapes an interpreted kernel runs in seconds)."""
    if small:
        return [int4_case(4, 256, 128), grouped_case(2, 8, 256, 128), routing_case(16, 64),
                routing_case(16, 64, 8, 4), attention_case(64, 2, 64, 32),
                paged_case(2, 2, 128, 1)]
    return [int4_case(16, 7168, 2048), int4_case(512, 2048, 7168),
            grouped_case(8, 384, 7168, 2048), grouped_case(512, 384, 2048, 7168),
            routing_case(64, 384), routing_case(4096, 256, 8, 4),
            attention_case(1024, 64, 192, 128), paged_case(8, 64, 8192, 4)]


# ---- lowering (any host) ----------------------------------------------------------------------

def lower_all() -> list[dict]:
    rows = []
    for case in cases(small=False):
        specs = jax.eval_shape(case.make_args, jax.random.key(0))
        for platform in lowering.PLATFORMS:
            start = time.perf_counter()
            try:
                fn = case.kernel(lowering.kernel_platform(platform), False)
                text = lowering.export(fn, specs, platform).mlir_module()
                status = "ok" if lowering.KERNEL_CALL[platform] in text else "no kernel call"
            except Exception as err:  # report every case, then fail
                status = f"error: {type(err).__name__}: {str(err)[:160]}"
            rows.append({"case": case.name, "platform": platform, "status": status,
                         "seconds": round(time.perf_counter() - start, 2)})
    return rows


def print_lowering(rows: list[dict]) -> None:
    print(f"{'kernel':<44} {'platform':<8} {'lowered':<8} {'s':>6}")
    for r in rows:
        ok = r["status"] == "ok"
        print(f"{r['case']:<44} {r['platform']:<8} {'ok' if ok else 'FAILED':<8} "
              f"{r['seconds']:>6.2f}")
        if not ok:
            print("   ", r["status"])


# ---- accuracy and timings (an accelerator, or --execute) --------------------------------------

def accuracy(small: bool, interpret: bool) -> list[dict]:
    platform = None if not interpret else "gpu"
    rows = []
    for n, case in enumerate(cases(small)):
        args = jax.jit(case.make_args)(jax.random.key(n))
        got = np.asarray(jax.jit(case.kernel(platform, interpret))(*args), np.float32)
        want = np.asarray(jax.jit(case.reference)(*args), np.float32)
        scale = max(float(np.abs(want).max()), 1e-30)
        rows.append({"case": case.name, "max_abs_error": float(np.abs(got - want).max()),
                     "relative": float(np.abs(got - want).max() / scale),
                     "finite": bool(np.isfinite(got).all())})
    return rows


def _roof(nbytes: float, bandwidth: float, times: dict) -> dict:
    """`% roof` of every timed method but the bf16 one, which reads four times the bytes."""
    return {name: round(100 * nbytes / bandwidth / (t * 1e-6), 1)
            for name, t in times.items() if isinstance(t, float) and name != "bf16"}


def matmul_rows(small: bool, reps: int, accelerator: bool, bandwidth: float) -> list[dict]:
    """`benchmarks/int4_matmul.py`'s dense and grouped rows with `% roof` of the INT4 bytes."""
    ms, tokens, experts = ([1, 8], [2], 8) if small else ([1, 16, 64, 512], [1, 8, 64], 384)
    shapes = {"gate/up 256x128": (256, 128)} if small else bench.SHAPES
    rows = []
    for row in (bench.dense_rows(ms, reps, accelerator, bandwidth, shapes)
                + bench.grouped_rows(tokens, experts, reps, accelerator, bandwidth, shapes)):
        nbytes = bench.weight_bytes(row["K"], row["N"], row["experts_hit"])["int4"]
        rows.append({"section": "grouped" if row["case"].startswith("grouped") else "int4",
                     "case": row["case"], "size": row["M"], "times_us": row["times_us"],
                     "roof_pct": _roof(nbytes, bandwidth, row["times_us"])})
    return rows


def routing_rows(small: bool, reps: int, accelerator: bool) -> list[dict]:
    experts = 64 if small else 384
    rows = []
    for tokens in ([1, 16] if small else [1, 64, 4096]):
        logits = jax.random.normal(jax.random.key(tokens), (tokens, experts))
        bias = jnp.zeros((experts,))
        methods = {"xla_top_k": lambda a, b: route(a, b, top_k=TOP_K, impl="reference")}
        if accelerator:
            methods["pallas"] = lambda a, b: route(a, b, top_k=TOP_K, impl="pallas")
        rows.append({"section": "routing", "case": f"route E={experts} top-{TOP_K}",
                     "size": tokens, "times_us": bench.measure(methods, (logits, bias), reps),
                     "roof_pct": {}})
    return rows


def decode_rows(small: bool, reps: int, bandwidth: float) -> list[dict]:
    import k2jax
    from generate import decode_bytes
    from serve.server_cli import random_params

    config = k2jax.ModelConfig.preset("tiny" if small else "small").replace(
        quantized_linears=("routed_experts",))
    params = jax.device_put(random_params(config, seed=0))
    context = 256
    step = jax.jit(lambda p, t, pos, c: k2jax.forward_cached(config, p, t, pos, c)[0])
    rows = []
    for batch in (1, 8):
        cache = k2jax.init_cache(config, batch, context, jnp.dtype(config.dtype))
        tokens = jnp.ones((batch, 1), jnp.int32)
        positions = jnp.full((batch, 1), context - 1, jnp.int32)
        times = bench.measure({"k2jax": step}, (params, tokens, positions, cache), reps)
        nbytes = decode_bytes(config, params, batch, context, jnp.dtype(config.dtype).itemsize)
        rows.append({"section": "decode", "case": f"decode step {'tiny' if small else 'small'} "
                     "INT4 experts", "size": batch, "times_us": times,
                     "roof_pct": _roof(nbytes, bandwidth, times)})
    return rows


def print_timings(rows: list[dict]) -> None:
    methods = []
    for row in rows:
        methods += [m for m in row["times_us"] if m not in methods]
    print(f"{'section':<8} {'case':<34} {'size':>5} " + " ".join(f"{m:>10}" for m in methods)
          + "   % roof")
    for row in rows:
        cells = " ".join(bench._cell(row["times_us"].get(m)) for m in methods)
        roof = " ".join(f"{m} {p:g}" for m, p in row["roof_pct"].items())
        print(f"{row['section']:<8} {row['case']:<34} {row['size']:>5} {cells}   {roof}")
    for row in rows:
        for name, t in row["times_us"].items():
            if isinstance(t, str):
                print(f"{row['case']} {row['size']} {name}: {t}")


def hbm_bandwidth(device_kind: str) -> float | None:
    return next((bw for name, bw in HBM_BANDWIDTH if name in device_kind), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lower-only", action="store_true",
                      help="only lower every kernel for cuda and tpu (the default on CPU)")
    mode.add_argument("--execute", action="store_true",
                      help="on CPU: run the device sections at small shapes, kernels interpreted")
    parser.add_argument("--reps", type=int, help="repetitions per timing (default 20, CPU 2)")
    _results.add_arguments(parser, "device_check")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    accelerator = jax.default_backend() in ("gpu", "tpu")
    result = {"device": device.device_kind, "backend": jax.default_backend(),
              "jax": jax.__version__}
    lowered = lower_all()
    result["lowering"] = lowered
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}\n")
    print_lowering(lowered)
    failed = any(r["status"] != "ok" for r in lowered)
    if args.lower_only or not (accelerator or args.execute):
        _results.write(args, "device_check", result)
        return 1 if failed else 0

    small, interpret = not accelerator, not accelerator
    reps = args.reps or (20 if accelerator else 2)
    bandwidth = hbm_bandwidth(device.device_kind)
    source = "vendor HBM figure"
    if bandwidth is None:
        bandwidth, source = bench.copy_bandwidth(1 << 30 if accelerator else 1 << 26, reps), \
            "measured copy bandwidth"
    result.update(bandwidth_GBps=bandwidth / 1e9, bandwidth_source=source,
                  accuracy=accuracy(small, interpret))
    print(f"\naccuracy ({'interpret mode, small shapes' if interpret else 'compiled kernels'})")
    print(f"{'kernel':<44} {'max |err|':>12} {'relative':>10}")
    for r in result["accuracy"]:
        print(f"{r['case']:<44} {r['max_abs_error']:>12.3g} {r['relative']:>10.3g}"
              + ("" if r["finite"] else "  NOT FINITE"))
    rows = (matmul_rows(small, reps, accelerator, bandwidth)
            + routing_rows(small, reps, accelerator) + decode_rows(small, reps, bandwidth))
    result["timings"] = rows
    print(f"\ntimings (us, median of {reps}); roofline at {bandwidth / 1e9:.0f} GB/s ({source})")
    print_timings(rows)
    _results.write(args, "device_check", result)
    bad = [r for r in result["accuracy"] if not r["finite"] or r["relative"] > 2e-2]
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
