"""Generation speed on the `small` preset: the k2jax engine vs HF transformers `generate()`.

    python benchmarks/generate.py                 # table; --write saves results/generate.json
    python benchmarks/generate.py --batches 1 8 --new-tokens 8    # a shorter run
    python benchmarks/generate.py --mesh expert=8  # adds the engine on an 8-device mesh

One process, one device, the same random weights in both (an HF `DeepseekV3ForCausalLM` with
every parameter random, read into the k2jax tree as `tests/hf_reference.py` does), float32 in
both (on CPU, XLA emulates bfloat16 matmuls). For each batch size B: B random prompts of
`--prompt-len` tokens, greedy, `--new-tokens` new tokens.

  ttft     time until the first tokens of the batch are out. HF: its prefill forward (to the
           first logits processor call). k2jax: the engine's first step, which prefills,
           samples the first tokens and also decodes the second ones.
  decode   decode tokens/s: B / the median decode step time (steps after the first); "best"
           uses the fastest step instead, the one least slowed by other processes

k2jax runs each shape once untimed first (compilation), with other prompts, so the prefix cache
never helps; the page-table width stays at its minimum bucket throughout, so nothing
recompiles. HF runs a warm-up generate too. The k2jax cache is the compressed MLA latent, in
the model dtype; HF keeps its own (expanded) cache.

`--mesh AXES` adds a row per batch for the same engine on a device mesh (the process then runs
with that many simulated CPU devices, `--xla_force_host_platform_device_count`, for every row):
the weights placed by the sharding rules, experts expert-parallel, pages and rows split over the
devices, `max_batch` rounded up to a multiple of the device count. On CPU the simulated devices
share the same cores, so this row shows that the sharded layout runs and what its collectives
and per-device programs cost, not a speed-up; on accelerators each device has its own memory
bandwidth.

Roofline (every batch): a decode step must read the weights it uses (everything but the routed
experts no row chose: at batch B, E(1 - (1 - K/E)^B) of the E are expected to be chosen) and
the latent cache of the live tokens once. That many bytes over the measured copy bandwidth
(the faster of an XLA and a numpy copy of 256 MiB) is the memory-bound step time; the table
gives it as a fraction of the measured step, and HF's step over it: the most any
implementation reading the float32 weights could gain over HF on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import _results  # benchmarks/_results.py, beside this script


def _force_cpu_devices(argv: list[str]) -> None:
    """`--mesh` needs its devices before JAX starts: simulate that many on CPU."""
    spec = next((b for a, b in zip(argv, argv[1:]) if a == "--mesh"), None)
    spec = spec or next((a.split("=", 1)[1] for a in argv if a.startswith("--mesh=")), None)
    if not spec:
        return
    count = 1
    for part in spec.split(","):
        count *= int(part.split("=")[1])
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])


_force_cpu_devices(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def copy_bandwidth(mib: int = 256) -> dict[str, float]:
    """GB/s of a large copy (bytes read + written), best of a few, with XLA and with numpy."""
    x = jnp.ones((mib << 20) // 4, jnp.float32)
    add = jax.jit(lambda a: a + 1.0)
    add(x).block_until_ready()
    xla = min(_timed(lambda: add(x).block_until_ready()) for _ in range(5))
    a, b = np.ones(x.size, np.float32), np.empty(x.size, np.float32)
    host = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return {"xla_gbps": 2 * x.nbytes / xla / 1e9, "numpy_gbps": 2 * a.nbytes / host / 1e9}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def stored_bytes(leaf) -> int:
    """Bytes of an array as the format stores it: int4 two values to a byte."""
    if leaf.dtype == jnp.int4:
        return leaf.size // 2
    return leaf.size * leaf.dtype.itemsize


def decode_bytes(config, params, batch: int, context: int, cache_itemsize: int) -> int:
    """Bytes a decode step of `batch` rows must read: the weights it uses (the routed experts
    expected to be chosen by at least one row under uniform routing, E(1 - (1 - K/E)^B), one
    embedding row per row) and the rows' latent cache."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(stored_bytes(leaf) for _, leaf in leaves)
    experts = sum(stored_bytes(leaf) for path, leaf in leaves
                  if "experts" in jax.tree_util.keystr(path)
                  and "shared_experts" not in jax.tree_util.keystr(path))
    chosen = 1 - (1 - config.num_experts_per_tok / config.n_routed_experts) ** batch
    unused = experts * (1 - chosen)
    embedding = params["embed_tokens"]["embedding"]
    unused += embedding.nbytes * (1 - batch / embedding.shape[0])
    cache = batch * context * config.cache_width * cache_itemsize * config.num_hidden_layers
    return int(total - unused + cache)


def bench_hf(model, prompts: np.ndarray, new_tokens: int) -> dict[str, float]:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        """Timestamps each generation step: the first call follows the prefill."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    ids = torch.as_tensor(prompts)

    def run(n):
        clock = StepClock()
        start = time.perf_counter()
        # min_new_tokens: every row runs to n tokens, eos or not.
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0,
                           logits_processor=LogitsProcessorList([clock]))
        return clock.times[0] - start, np.diff(clock.times)

    run(2)  # warm-up
    ttft, steps = run(new_tokens)
    return _summary(ttft, steps, len(prompts))


def _summary(ttft: float, steps, batch: int) -> dict[str, float]:
    """Decode speed from the median step, and from the fastest (least disturbed by other
    processes on a shared machine)."""
    median, best = float(np.median(steps)), float(np.min(steps))
    return {"ttft_s": ttft, "decode_step_s": median, "decode_tok_s": batch / median,
            "best_step_s": best, "best_decode_tok_s": batch / best}


def bench_k2jax(config, params, prompts: np.ndarray, warmup: np.ndarray,
                new_tokens: int, max_seq_len: int | None = None,
                mesh=None) -> dict[str, float]:
    """The engine's TTFT and decode speed; its page pool holds every slot at `max_seq_len`
    (by default the shortest power of two that fits the run). On a `mesh` the slots are
    rounded up to a multiple of its devices."""
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    batch, prompt_len = prompts.shape
    shards = 1 if mesh is None else mesh.size
    engine = Engine(config, params, max_batch=-(-batch // shards) * shards, page_size=16,
                    max_seq_len=max_seq_len or 1 << (prompt_len + new_tokens - 1).bit_length(),
                    mesh=mesh)

    def run(rows, n):
        """Seconds of each engine step generating n tokens per row. The first step prefills
        and returns the first token (it also decodes the second); each later one decodes."""
        sampling = SamplingParams(max_new_tokens=n, temperature=0)
        ids = [engine.add_request(r, sampling) for r in rows.tolist()]
        times = []
        while engine.has_unfinished():
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        for i in ids:
            engine.pop_result(i)
        return times

    run(warmup, 2)  # compiles every shape the timed run uses
    times = run(prompts, new_tokens)
    return _summary(times[0], times[1:], batch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--mesh", default=None,
                        help="also run the engine on this mesh, e.g. expert=8 (simulated CPU "
                             "devices)")
    _results.add_arguments(parser, "generate")
    args = parser.parse_args(argv)

    import torch

    import k2jax
    from k2jax import sharding
    from tests.hf_reference import params_from_hf_model, random_hf_model

    config = k2jax.ModelConfig.preset(args.preset).replace(dtype="float32")
    hf = random_hf_model(config, seed=0, std=0.02)
    params = jax.tree.map(jnp.asarray, params_from_hf_model(config, hf))
    rng = np.random.default_rng(0)
    mesh = sharding.make_mesh(args.mesh) if args.mesh else None

    def prompts_and_warmup(batch):
        """Two sets of `batch` random prompts: timed, and untimed for compilation."""
        return tuple(rng.integers(3, config.vocab_size, (batch, args.prompt_len))
                     for _ in range(2))

    load_before = os.getloadavg()  # other processes on the machine skew every timing
    bandwidth = copy_bandwidth()
    # One untimed engine run first: the first in a process runs its steps ~30% slower (the
    # allocator and thread pools warming up), which would land on whichever batch came first.
    bench_k2jax(config, params, *prompts_and_warmup(1), args.new_tokens)
    rows = []
    for batch in args.batches:
        prompts, warmup = prompts_and_warmup(batch)
        ours = bench_k2jax(config, params, prompts, warmup, args.new_tokens)
        theirs = bench_hf(hf, prompts, args.new_tokens)
        row = {"batch": batch, "hf": theirs, "k2jax": ours,
               "decode_speedup": ours["decode_tok_s"] / theirs["decode_tok_s"],
               "ttft_speedup": theirs["ttft_s"] / ours["ttft_s"]}
        if mesh is not None:
            sharded = bench_k2jax(config, params, prompts, warmup, args.new_tokens, mesh=mesh)
            row["k2jax_mesh"] = dict(sharded, mesh=args.mesh, devices=mesh.size,
                                     vs_one_device=sharded["decode_tok_s"]
                                     / ours["decode_tok_s"])
        context = args.prompt_len + args.new_tokens // 2
        nbytes = decode_bytes(config, params, batch, context, 4)
        bound = nbytes / (max(bandwidth.values()) * 1e9)
        row["roofline"] = {"bytes_per_step": nbytes, "bound_step_s": bound,
                           "fraction": bound / ours["decode_step_s"],
                           "best_fraction": bound / ours["best_step_s"],
                           # What the memory bound allows against HF's measured step.
                           "bound_speedup_vs_hf": theirs["decode_step_s"] / bound}
        rows.append(row)
        print(f"batch {batch}: {json.dumps(row)}", file=sys.stderr, flush=True)

    # A serving-sized pool (every slot at 4096 tokens): the step must not grow with it.
    prompts, warmup = prompts_and_warmup(1)
    big_pool = bench_k2jax(config, params, prompts, warmup, args.new_tokens, max_seq_len=4096)

    load = {"cpus": os.cpu_count(), "loadavg_1min_before": load_before[0],
            "loadavg_1min_after": os.getloadavg()[0]}
    print(f"\n`{args.preset}` preset, float32, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy; {jax.devices()[0].device_kind} "
          f"({platform.processor() or platform.machine()}, {load['cpus']} cores, load average "
          f"{load['loadavg_1min_before']:.1f} before / {load['loadavg_1min_after']:.1f} after), "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'HF ttft s':>10} {'k2jax ttft s':>13} {'HF decode tok/s':>16} "
          f"{'k2jax decode tok/s':>19} {'decode x':>9} {'best x':>7}")
    for r in rows:
        hf, ours = r["hf"], r["k2jax"]
        print(f"{r['batch']:>5} {hf['ttft_s']:>10.3f} {ours['ttft_s']:>13.3f} "
              f"{hf['decode_tok_s']:>16.1f} {ours['decode_tok_s']:>19.1f} "
              f"{r['decode_speedup']:>9.2f} "
              f"{ours['best_decode_tok_s'] / hf['best_decode_tok_s']:>7.2f}")
    if mesh is not None:
        print(f"\nthe same engine on mesh {args.mesh} ({mesh.size} simulated CPU devices on "
              f"the same {load['cpus']} cores: the layout runs; its cost, not a speed-up)")
        print(f"{'batch':>5} {'1-device tok/s':>15} {'mesh ttft s':>12} {'mesh decode tok/s':>18} "
              f"{'mesh / 1 device':>16}")
        for r in rows:
            m = r["k2jax_mesh"]
            print(f"{r['batch']:>5} {r['k2jax']['decode_tok_s']:>15.1f} {m['ttft_s']:>12.3f} "
                  f"{m['decode_tok_s']:>18.1f} {m['vs_one_device']:>16.2f}")
    print(f"\nmemory roofline: bytes a decode step must read at {max(bandwidth.values()):.1f} "
          f"GB/s copy bandwidth")
    print(f"{'batch':>5} {'MB/step':>8} {'bound ms':>9} {'k2jax ms':>9} {'best ms':>8} "
          f"{'% roofline':>11} {'bound / HF':>11}")
    for r in rows:
        roof, ours = r["roofline"], r["k2jax"]
        print(f"{r['batch']:>5} {roof['bytes_per_step'] / 1e6:>8.0f} "
              f"{roof['bound_step_s'] * 1e3:>9.1f} {ours['decode_step_s'] * 1e3:>9.1f} "
              f"{ours['best_step_s'] * 1e3:>8.1f} {100 * roof['fraction']:>10.0f}% "
              f"{roof['bound_speedup_vs_hf']:>10.1f}x")
    print(f"batch-1 decode step with a 4096-token page pool: "
          f"{big_pool['decode_step_s'] * 1e3:.1f} ms")
    _results.write(args, "generate", {
        "preset": args.preset, "dtype": "float32", "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "device": jax.devices()[0].device_kind,
        "mesh": args.mesh,
        "machine": load, "bandwidth": bandwidth, "rows": rows,
        "batch1_pool_4096_tokens": big_pool})
    return 0


if __name__ == "__main__":
    sys.exit(main())
