"""Greedy generation equals HF transformers' greedy `generate()` token for token (float32)."""

import numpy as np
import torch

import k2jax
from serve.generation import generate
from tests.hf_reference import params_from_hf_model, random_hf_model

CONFIG = k2jax.ModelConfig.preset("tiny").replace(dtype="float32")
ENGINE = dict(max_batch=4, max_seq_len=64, page_size=8, prefill_chunk=16)


def _hf_greedy(model, prompts, max_new_tokens):
    """HF batched greedy generate with left padding; returns each row's new tokens up to and
    including the first eos (HF pads after it)."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=CONFIG.eos_token_id)
    rows = []
    for row in out[:, width:].tolist():
        if CONFIG.eos_token_id in row:
            row = row[:row.index(CONFIG.eos_token_id) + 1]
        rows.append(row)
    return rows


def test_greedy_equals_hf_generate():
    model = random_hf_model(CONFIG, seed=0)
    params = params_from_hf_model(CONFIG, model)
    rng = np.random.default_rng(0)
    # Different lengths in one batch: within a page, across pages, and a full prefill chunk;
    # generation runs past the 32-token YaRN original context.
    prompts = [rng.integers(3, CONFIG.vocab_size, n).tolist() for n in (5, 11, 16)]
    max_new_tokens = 24
    expected = _hf_greedy(model, prompts, max_new_tokens)
    results = generate((CONFIG, params), prompts, max_new_tokens=max_new_tokens, temperature=0,
                       **ENGINE)
    for prompt, result, want in zip(prompts, results, expected):
        assert result.token_ids == want, f"prompt of {len(prompt)} tokens"
        assert result.finish_reason == ("stop" if want[-1] == CONFIG.eos_token_id else "length")
