"""`k2jax generate`: batched generation from the command line.

Prompts are token ids for now (`--prompt-ids`, repeated for a batch); text prompts plug in
through `serve.generation.generate(tokenizer=...)` once a tokenizer is given. The model is a
checkpoint or a preset with random weights.
"""

from __future__ import annotations

import argparse
import json
import time

EXAMPLE = """example (random weights, CPU, well under a minute):
  k2jax generate --preset tiny --prompt-ids 1,2,3 --prompt-ids 4,5,6,7 --max-new-tokens 8
  k2jax generate --preset tiny --prompt-ids 1,2,3 --temperature 0.8 --top-p 0.9 --seed 0 --n 2
"""

# CLI option -> SamplingParams field (only those given are passed on).
SAMPLING_OPTIONS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p",
                    "repetition_penalty", "presence_penalty", "frequency_penalty", "n", "seed",
                    "logprobs", "stop_token_ids")
ENGINE_OPTIONS = ("max_batch", "page_size", "num_pages", "cache_dtype", "prefill_chunk")


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}")
    if not ids:
        raise argparse.ArgumentTypeError("empty token id list")
    return ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="k2jax checkpoint directory")
    model.add_argument("--preset", help="named config with random weights (tiny, small, ...)")
    parser.add_argument("--dtype", help="compute dtype of a --preset model (default: float32 "
                        "on CPU, where bfloat16 matmuls are emulated; else the preset's)")
    parser.add_argument("--weights-seed", type=int, default=0, help="seed of random weights")
    parser.add_argument("--prompt-ids", type=_ids, action="append", required=True,
                        help="comma-separated token ids of one prompt; repeat for a batch")
    s = parser.add_argument_group("sampling (as vLLM SamplingParams / HF generate)")
    s.add_argument("--max-new-tokens", "--max-tokens", type=int, dest="max_new_tokens")
    s.add_argument("--temperature", type=float, help="0 is greedy (default 1.0)")
    s.add_argument("--top-p", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--min-p", type=float)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--presence-penalty", type=float)
    s.add_argument("--frequency-penalty", type=float)
    s.add_argument("--n", type=int, help="completions per prompt")
    s.add_argument("--seed", type=int)
    s.add_argument("--logprobs", type=int, help="0: chosen tokens' logprobs; N: also top N")
    s.add_argument("--stop-token-ids", type=_ids)
    e = parser.add_argument_group("engine")
    e.add_argument("--max-batch", type=int, help="sequences decoding together")
    e.add_argument("--page-size", type=int)
    e.add_argument("--num-pages", type=int)
    e.add_argument("--cache-dtype", help="bfloat16, float32 or float8_e4m3fn")
    e.add_argument("--prefill-chunk", type=int)
    parser.add_argument("--stream", action="store_true", help="print tokens as they come")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _model(args):
    if args.checkpoint:
        import k2jax

        return k2jax.load(args.checkpoint)
    import jax

    import k2jax

    config = k2jax.ModelConfig.preset(args.preset)
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else config.dtype)
    config = config.replace(dtype=dtype)
    return config, k2jax.init_params(config, jax.random.key(args.weights_seed))


def run(args: argparse.Namespace) -> int:
    from serve import generation

    options = {k: getattr(args, k) for k in SAMPLING_OPTIONS + ENGINE_OPTIONS
               if getattr(args, k) is not None}
    model = _model(args)
    start = time.perf_counter()
    if args.stream:
        tokens = 0
        for delta in generation.stream(model, args.prompt_ids, **options):
            tokens += len(delta.token_ids)
            end = f" [{delta.finish_reason}]" if delta.finish_reason else ""
            print(f"prompt {delta.request_id}.{delta.index}: {delta.token_ids}{end}", flush=True)
    else:
        results = generation.generate(model, args.prompt_ids, **options)
        tokens = sum(len(o.token_ids) for r in results for o in r.outputs)
        if args.json:
            print(json.dumps([{"prompt_token_ids": r.prompt_token_ids,
                               "outputs": [vars(o) for o in r.outputs]} for r in results]))
        else:
            for i, r in enumerate(results):
                for o in r.outputs:
                    print(f"prompt {i}.{o.index} ({len(r.prompt_token_ids)} tokens) -> "
                          f"{len(o.token_ids)} tokens [{o.finish_reason}]: "
                          f"{' '.join(map(str, o.token_ids))}")
    seconds = time.perf_counter() - start
    if not args.json:
        print(f"{tokens} tokens in {seconds:.2f} s, compilation included "
              f"({tokens / seconds:.1f} tokens/s)")
    return 0
