"""`generate` and `stream`: batched generation in one call.

    results = generate((config, params), [[1, 2, 3], [4, 5]], max_new_tokens=8, temperature=0)
    results[0].token_ids, results[0].finish_reason

The model is a checkpoint path (read with `k2jax.load`) or a `(config, params)` pair. Prompts
are token-id lists; text prompts need a `tokenizer` (a `K2Tokenizer`, e.g. from
`k2jax.text.load_tokenizer(path)`, the path itself, or anything with `encode(text) -> ids` and
`decode(ids) -> text`), which also fills `text` and enables `stop` strings. Sampling parameters
are keyword arguments named as in vLLM's `SamplingParams` / HF `generate()` (see
`serve.sampling.SamplingParams`), or `sampling_params=` one `SamplingParams` or one per prompt.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Iterable, Iterator

import jax

from k2jax import sharding
from serve.engine import Engine, GenerationResult, StreamDelta
from serve.sampling import SamplingParams
from serve.scheduler import bucket

ENGINE_OPTIONS = ("max_batch", "max_seq_len", "page_size", "num_pages", "cache_dtype",
                  "prefill_chunk", "prefix_sharing", "mesh")
MAX_DEFAULT_BATCH = 64


def load_model(model_or_checkpoint, mesh=None):
    """`(config, params)` from a pair or a checkpoint directory (read straight onto `mesh`'s
    parameter shardings, each device's chunks only, when given)."""
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        import k2jax

        return k2jax.load(model_or_checkpoint, mesh)
    if isinstance(model_or_checkpoint, tuple) and len(model_or_checkpoint) == 2:
        return model_or_checkpoint
    raise TypeError("model must be a checkpoint path or a (config, params) pair, got "
                    f"{type(model_or_checkpoint).__name__}")


def as_tokenizer(tokenizer):
    """`tokenizer`, or the K2 tokenizer at it when it is a path (file or directory)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from k2jax.text import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def _prompt_list(prompts, tokenizer) -> list[list[int]]:
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], numbers.Integral)):
        prompts = [prompts]  # one prompt: a string or a sequence of token ids
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer (tokenizer=...)")
            prompt = tokenizer.encode(prompt)
        out.append([int(t) for t in prompt])
    if not out:
        raise ValueError("no prompts given")
    return out


def params_per_prompt(count: int, sampling_params, sampling_kwargs,
                      what: str = "prompts") -> list[SamplingParams]:
    """One `SamplingParams` for each of `count` prompts (or conversations: `what`), from
    `sampling_params` (one, or one per prompt) or else the sampling keyword arguments."""
    if sampling_params is not None and sampling_kwargs:
        raise ValueError("give sampling_params or sampling keyword arguments, not both "
                         f"(got {sorted(sampling_kwargs)})")
    if sampling_params is None:
        return [SamplingParams.from_kwargs(**sampling_kwargs)] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    sampling_params = list(sampling_params)
    if len(sampling_params) != count:
        raise ValueError(f"{len(sampling_params)} sampling_params for {count} {what}")
    return sampling_params


def split_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(engine options, sampling keyword arguments)` of `generate`'s keyword arguments."""
    kwargs = dict(kwargs)
    engine = {k: kwargs.pop(k) for k in ENGINE_OPTIONS if k in kwargs}
    return engine, kwargs


def resolve_mesh(engine_options: dict[str, Any]):
    """The `mesh` engine option as a `Mesh` (made from a spec such as `"expert=8"`), stored
    back into `engine_options`; None when absent."""
    mesh = engine_options.get("mesh")
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        mesh = engine_options["mesh"] = sharding.make_mesh(mesh)
    return mesh


def make_engine(model_or_checkpoint, prompts: list[list[int]], params: list[SamplingParams],
                tokenizer=None, **engine_options) -> Engine:
    """An `Engine` sized for these prompts unless the options say otherwise: slots for every
    completion (up to 64) and a context just long enough, both rounded up to powers of two so
    that later calls reuse the compiled programs. `mesh` may be a `Mesh` or its spec
    (`"expert=8"`); slots then come in multiples of its size."""
    mesh = resolve_mesh(engine_options)
    config, model_params = load_model(model_or_checkpoint, mesh)
    completions = sum(p.n for p in params)
    devices = 1 if mesh is None else mesh.size
    engine_options.setdefault(
        "max_batch", -(-bucket(completions, MAX_DEFAULT_BATCH) // devices) * devices)
    longest = max(len(t) + p.max_new_tokens for t, p in zip(prompts, params))
    engine_options.setdefault("max_seq_len", bucket(longest, config.max_position_embeddings, 64))
    detokenize = tokenizer.decode if tokenizer is not None else None
    return Engine(config, model_params, detokenize=detokenize, **engine_options)


def stream(model_or_checkpoint, prompts, *, tokenizer=None, sampling_params=None,
           **kwargs) -> Iterator[StreamDelta]:
    """Like `generate`, but yields each completion's new tokens (and text) step by step.

    `StreamDelta.request_id` is the prompt's index in `prompts`.
    """
    tokenizer = as_tokenizer(tokenizer)
    engine_options, sampling_kwargs = split_options(kwargs)
    prompt_ids = _prompt_list(prompts, tokenizer)
    params = params_per_prompt(len(prompt_ids), sampling_params, sampling_kwargs)
    engine = make_engine(model_or_checkpoint, prompt_ids, params, tokenizer, **engine_options)
    yield from run_engine(engine, prompt_ids, params)


def run_engine(engine: Engine, prompts: list[list[int]],
               params: list[SamplingParams]) -> Iterable[StreamDelta]:
    """Adds the prompts (request ids 0, 1, ... in order on a fresh engine) and steps the
    engine until all are done, yielding its deltas."""
    for prompt, p in zip(prompts, params):
        engine.add_request(prompt, p)
    while engine.has_unfinished():
        yield from engine.step()
        for error in engine.pop_failures().values():
            raise error


def generate(model_or_checkpoint, prompts, *, tokenizer=None, sampling_params=None,
             **kwargs) -> list[GenerationResult]:
    """Generates for every prompt; returns one `GenerationResult` per prompt, in order.

    Args:
      model_or_checkpoint: a checkpoint path or `(config, params)`.
      prompts: a prompt or a list of them; a prompt is a list of token ids (or text, with a
        tokenizer). A conversation (a list of OpenAI message dicts) or a list of them goes to
        `serve.chat.generate_chat`: rendered with the chat template, results parsed into
        `reasoning_content`, `content` and `tool_calls` (`tools=` and `heavy=` accepted there).
      tokenizer: optional; encodes text prompts, decodes `text`, enables `stop` strings; a
        path is read with `k2jax.text.load_tokenizer`.
      sampling_params: a `SamplingParams` or one per prompt (instead of keyword arguments).
      **kwargs: sampling parameters (`max_new_tokens`/`max_tokens`, `temperature`, `top_p`,
        `top_k`, `min_p`, `repetition_penalty`, `presence_penalty`, `frequency_penalty`, `n`,
        `stop`, `stop_token_ids`, `seed`, `logprobs`) and `Engine` options (`max_batch`,
        `max_seq_len`, `page_size`, `num_pages`, `cache_dtype`, `prefill_chunk`,
        `prefix_sharing`, `mesh`: a `Mesh` or a spec such as `"expert=8"`). Anything else
        raises.
    """
    from serve import chat  # chat builds on this module

    tokenizer = as_tokenizer(tokenizer)
    if chat.is_chat(prompts):
        return chat.generate_chat(model_or_checkpoint, prompts, tokenizer=tokenizer,
                                  sampling_params=sampling_params, **kwargs)
    engine_options, sampling_kwargs = split_options(kwargs)
    prompt_ids = _prompt_list(prompts, tokenizer)
    params = params_per_prompt(len(prompt_ids), sampling_params, sampling_kwargs)
    engine = make_engine(model_or_checkpoint, prompt_ids, params, tokenizer, **engine_options)
    for _ in run_engine(engine, prompt_ids, params):
        pass
    return [engine.pop_result(i) for i in range(len(prompt_ids))]
