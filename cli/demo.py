"""`k2jax demo`: a random-weight model generating a batch through the serving engine.

Builds a preset (`small` by default, `--preset tiny` for speed) with random weights, then runs a
batch of prompts of different lengths through `serve.engine.Engine`: batched prefill, then
decode over the paged latent cache. The batch runs twice, so the second run shows compiled speed.
"""

from __future__ import annotations

import argparse
import time

EXAMPLE = """example:
  k2jax demo --preset tiny
  k2jax demo                      # the ~270M-parameter `small` preset
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="small", help="model preset (default: small)")
    parser.add_argument("--batch", type=int, default=4, help="prompts in the batch")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--dtype", help="compute dtype (default: float32 on CPU, where bfloat16 "
                        "matmuls are emulated; else the preset's)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    import k2jax
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    config = k2jax.ModelConfig.preset(args.preset)
    config = config.replace(
        dtype=args.dtype or ("float32" if jax.default_backend() == "cpu" else config.dtype))
    params = k2jax.init_params(config, jax.random.key(args.seed))
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"preset {args.preset}: {config.num_hidden_layers} layers, {config.n_routed_experts} "
          f"experts, {count / 1e6:.1f}M parameters, {config.dtype}, on "
          f"{jax.devices()[0].platform}")
    rng = np.random.default_rng(args.seed)
    lengths = [int(n) for n in np.linspace(5, 60, args.batch)]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0)
    engine = Engine(config, params, max_batch=args.batch, max_seq_len=128, page_size=16)
    for attempt in ("first run (compiles)", "second run"):
        # Fresh prompts each run: repeating them would hit the engine's prefix cache.
        prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in lengths]
        start = time.perf_counter()
        ids = [engine.add_request(p, sampling) for p in prompts]
        first_token = None
        while engine.has_unfinished():
            engine.step()
            first_token = first_token or time.perf_counter() - start
        seconds = time.perf_counter() - start
        results = [engine.pop_result(i) for i in ids]
        tokens = sum(len(r.token_ids) for r in results)
        print(f"{attempt}: {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tokens/s, "
              f"first tokens after {first_token:.2f} s)")
    for prompt, result in zip(prompts, results):
        print(f"  prompt of {len(prompt):3d} tokens -> {result.token_ids} [{result.finish_reason}]")
    return 0
