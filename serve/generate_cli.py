"""`k2jax generate`: batched generation from the command line.

Prompts are text (`--prompt`, encoded with the checkpoint's tokenizer or `--tokenizer`; with
`--chat` each is one user message rendered with the K2 chat template, and the answer is parsed
into reasoning, content and tool calls) or token ids (`--prompt-ids`); repeat either for a
batch. The model is a checkpoint or a preset with random weights.
"""

from __future__ import annotations

import argparse
import json
import time

EXAMPLE = """example (random weights, CPU, well under a minute):
  k2jax generate --preset tiny --prompt "The capital of France is" --max-new-tokens 8
  k2jax generate --preset tiny --chat --prompt "What is 2 + 2?" --max-new-tokens 16
  k2jax generate --preset tiny --prompt-ids 1,2,3 --prompt-ids 4,5,6,7 --max-new-tokens 8
  k2jax generate --preset tiny --prompt-ids 1,2,3 --temperature 0.8 --top-p 0.9 --seed 0 --n 2
  k2jax generate --preset tiny --prompt-ids 1,2,3 --mesh expert=8 --max-new-tokens 8
"""

# CLI option -> SamplingParams field (only those given are passed on).
SAMPLING_OPTIONS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p",
                    "repetition_penalty", "presence_penalty", "frequency_penalty", "n", "seed",
                    "logprobs", "stop_token_ids")
ENGINE_OPTIONS = ("max_batch", "page_size", "num_pages", "cache_dtype", "prefill_chunk", "mesh")


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
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="a text prompt; repeat for a batch")
    prompts.add_argument("--prompt-ids", type=_ids, action="append",
                         help="comma-separated token ids of one prompt; repeat for a batch")
    parser.add_argument("--chat", action="store_true",
                        help="each --prompt is a user message, rendered with the chat template")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tiktoken.model (or its directory); default: the checkpoint's, or "
                             "the test tokenizer for presets")
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
    e.add_argument("--mesh", metavar="AXES",
                   help="device mesh, as `k2jax train --mesh`: e.g. expert=8, expert=4,tensor=2 "
                        "(default: one device)")
    parser.add_argument("--stream", action="store_true", help="print tokens as they come")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")


def _model(args, mesh=None):
    """`(config, params, tokenizer)`; the tokenizer is None for token-id prompts. A checkpoint
    is read straight onto `mesh` when given."""
    import jax

    import k2jax

    text = args.prompt is not None
    if args.checkpoint:
        config, params = k2jax.load(args.checkpoint, mesh)
        tokenizer = None
        if text:
            from k2jax.text import load_tokenizer

            try:
                tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{e} (--tokenizer PATH)") from None
        return config, params, tokenizer
    config = k2jax.ModelConfig.preset(args.preset)
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else config.dtype)
    config = config.replace(dtype=dtype)
    tokenizer = None
    if text:
        from serve.server_cli import preset_and_tokenizer

        config, tokenizer = preset_and_tokenizer(config, args.preset, args.tokenizer)
    return config, k2jax.init_params(config, jax.random.key(args.weights_seed)), tokenizer


def _check_args(args) -> None:
    if args.chat and args.prompt is None:
        raise ValueError("--chat takes text prompts (--prompt TEXT), not --prompt-ids")
    if args.chat and args.stream:
        raise ValueError("--stream prints token deltas; with --chat, leave --stream out and "
                         "the parsed answer is printed at the end")
    if args.tokenizer and args.prompt is None:
        raise ValueError("--tokenizer encodes --prompt TEXT; token-id prompts need none")


def _print_chat(results) -> None:
    for i, r in enumerate(results):
        for o in r.outputs:
            print(f"conversation {i}.{o.index} [{o.finish_reason}]")
            if o.reasoning_content:
                print(f"  reasoning: {o.reasoning_content}")
            print(f"  content: {o.content}")
            for call in o.tool_calls or []:
                print(f"  tool call: {json.dumps(call, ensure_ascii=False)}")


def run(args: argparse.Namespace) -> int:
    from serve import generation

    _check_args(args)
    options = {k: getattr(args, k) for k in SAMPLING_OPTIONS + ENGINE_OPTIONS
               if getattr(args, k) is not None}
    if args.mesh:
        from k2jax import sharding

        options["mesh"] = sharding.make_mesh(args.mesh)
    config, params, tokenizer = _model(args, options.get("mesh"))
    prompts = args.prompt_ids if args.prompt is None else args.prompt
    if args.chat:
        prompts = [[{"role": "user", "content": text}] for text in prompts]
    start = time.perf_counter()
    if args.stream:
        tokens = 0
        for delta in generation.stream((config, params), prompts, tokenizer=tokenizer,
                                       **options):
            tokens += len(delta.token_ids)
            end = f" [{delta.finish_reason}]" if delta.finish_reason else ""
            shown = delta.token_ids if delta.text is None else repr(delta.text)
            print(f"prompt {delta.request_id}.{delta.index}: {shown}{end}", flush=True)
    else:
        results = generation.generate((config, params), prompts, tokenizer=tokenizer, **options)
        tokens = sum(len(o.token_ids) for r in results for o in r.outputs)
        if args.json:
            print(json.dumps([{"prompt_token_ids": r.prompt_token_ids,
                               "outputs": [_jsonable(o) for o in r.outputs]} for r in results]))
        elif args.chat:
            _print_chat(results)
        else:
            for i, r in enumerate(results):
                for o in r.outputs:
                    shown = ' '.join(map(str, o.token_ids)) if o.text is None else repr(o.text)
                    print(f"prompt {i}.{o.index} ({len(r.prompt_token_ids)} tokens) -> "
                          f"{len(o.token_ids)} tokens [{o.finish_reason}]: {shown}")
    seconds = time.perf_counter() - start
    if not args.json:
        print(f"{tokens} tokens in {seconds:.2f} s, compilation included "
              f"({tokens / seconds:.1f} tokens/s)")
    return 0


def _jsonable(completion) -> dict:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(completion).items()}
