"""Small K2-format tokenizers for tests.

`train_ranks` learns a byte-level BPE from a short built-in corpus (English, code, JSON, Chinese,
emoji, K2 chat markup) with K2's pre-tokenizer, `write_tiktoken_file` writes it in the
`tiktoken.model` format (`BASE64 RANK` per line), and `tiny_tokenizer(vocab_size)` gives a
`K2Tokenizer` over it whose vocabulary (base ranks + 256 special slots) matches a tiny model's.
Everything is deterministic and takes well under a second.
"""

import base64
import functools
import json
import os
from collections import Counter
from pathlib import Path

import regex

from k2jax.text import special_tokens as st
from k2jax.text.special_tokens import NUM_SPECIAL_SLOTS
from k2jax.text.tokenizer import PRETOKENIZE_PATTERN, K2Tokenizer

NUM_BYTE_TOKENS = 256

SAMPLE_CORPUS = """\
The quick brown fox jumps over the lazy dog. It's a sunny day; we're going to the park, and they'll
meet us there. THE END. Don't forget: the weather today is 23 degrees and the wind is from the west.
You are Kimi, an AI assistant created by Moonshot AI. How can I help you today? Let me think about
this step by step. First, I need to check the weather. Then I will search the web for the answer.
def get_weather(city: str, unit: str = "celsius") -> dict:
    return {"city": city, "temperature": 23, "unit": unit}

for i in range(10):
    print(i * i)
{"name": "get_weather", "arguments": {"city": "Beijing", "unit": "celsius"}}
{"type":"function","function":{"name":"search","parameters":{"type":"object","properties":{"query":{"type":"string"}}}}}
functions.get_weather:0 functions.search:1 functions.read_file:2
## Return of functions.get_weather:0
今天天气很好，我们去公园散步吧。北京的温度是二十三度。你好，世界！人工智能助手。
Die Straße ist schön. Ça va très bien, merci. ¿Dónde está la estación? Привет, как дела?
Emoji: 😀 🎉 👍🏽 ❤️ 🚀 — and symbols: → ≤ ≥ ∑ π ∞ © ®.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2026-01-01 12:30:45
"""


def train_ranks(num_base_tokens: int, corpus: str = SAMPLE_CORPUS) -> dict[bytes, int]:
    """Byte-level BPE ranks: the 256 bytes (rank = byte value), then merges learned on `corpus`.

    Each step merges the most frequent adjacent pair inside K2 pre-tokens (ties go to the larger
    pair, so the result is deterministic) until there are `num_base_tokens` ranks.
    """
    if num_base_tokens < NUM_BYTE_TOKENS:
        raise ValueError(f"num_base_tokens must be at least {NUM_BYTE_TOKENS}, got {num_base_tokens}")
    ranks = {bytes([b]): b for b in range(NUM_BYTE_TOKENS)}
    piece_counts = Counter(regex.compile(PRETOKENIZE_PATTERN, flags=regex.V1).findall(corpus))
    words = [[bytes([b]) for b in piece.encode("utf-8")] for piece in piece_counts]
    weights = list(piece_counts.values())
    while len(ranks) < num_base_tokens:
        pair_counts = Counter()
        for word, weight in zip(words, weights):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += weight
        if not pair_counts:
            raise ValueError(f"corpus supports only {len(ranks)} ranks, {num_base_tokens} asked for")
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], pair))
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        words = [_merge_pair(word, best, merged) for word in words]
    return ranks


def _merge_pair(word: list[bytes], pair: tuple[bytes, bytes], merged: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def write_tiktoken_file(path: str | os.PathLike, ranks: dict[bytes, int]) -> Path:
    """Writes ranks as `BASE64 RANK` lines, in rank order (the `tiktoken.model` format)."""
    path = Path(path)
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n"
             for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
    path.write_text("".join(lines), encoding="ascii")
    return path


@functools.lru_cache(maxsize=None)
def _cached_ranks(num_base_tokens: int) -> tuple[tuple[bytes, int], ...]:
    return tuple(train_ranks(num_base_tokens).items())


def tiny_ranks(vocab_size: int = 768) -> dict[bytes, int]:
    """Ranks for a tokenizer whose full vocabulary (with the 256 special slots) is `vocab_size`."""
    smallest = NUM_BYTE_TOKENS + NUM_SPECIAL_SLOTS
    if vocab_size < smallest:
        raise ValueError(f"vocab_size must be at least {smallest}, got {vocab_size}")
    return dict(_cached_ranks(vocab_size - NUM_SPECIAL_SLOTS))


def tiny_tokenizer(vocab_size: int = 768) -> K2Tokenizer:
    """A K2Tokenizer with `vocab_size` ids in all, e.g. `tiny_tokenizer(config.vocab_size)`."""
    return K2Tokenizer(tiny_ranks(vocab_size), name=f"kimi-k2-tiny-{vocab_size}")


def write_tiny_tiktoken_file(directory: str | os.PathLike, vocab_size: int = 768) -> Path:
    """Writes `tiktoken.model` for `tiny_tokenizer(vocab_size)` into `directory`; returns its path."""
    return write_tiktoken_file(Path(directory) / "tiktoken.model", tiny_ranks(vocab_size))


# The tool-call markers are not `special` in K2's table (they are kept by skip_special_tokens).
_NOT_SPECIAL = {st.TOOL_CALLS_SECTION_BEGIN, st.TOOL_CALLS_SECTION_END, st.TOOL_CALL_BEGIN,
                st.TOOL_CALL_ARGUMENT_BEGIN, st.TOOL_CALL_END}


def write_tokenizer_config(directory: str | os.PathLike, num_base_tokens: int,
                           names: dict[int, str] | None = None, **fields) -> Path:
    """Writes `tokenizer_config.json` in the hub's format (K2's fields, `added_tokens_decoder`
    keyed by id strings); `names` (`{id: text}`) default to K2's layout after
    `num_base_tokens` ranks; `fields` override top-level entries."""
    if names is None:
        names = {num_base_tokens + k2_id - st.K2_NUM_BASE_TOKENS: text
                 for text, k2_id in st.K2_SPECIAL_TOKEN_IDS.items()}
    table = {str(token_id): {"content": text, "lstrip": False, "normalized": False,
                             "rstrip": False, "single_word": False,
                             "special": text not in _NOT_SPECIAL}
             for token_id, text in sorted(names.items())}
    config = {
        "added_tokens_decoder": table,
        "additional_special_tokens": [st.IM_END, st.IM_USER, st.IM_ASSISTANT,
                                      "<|start_header_id|>", "<|end_header_id|>", "[EOT]",
                                      st.IM_SYSTEM, st.IM_MIDDLE],
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": st.BOS, "clean_up_tokenization_spaces": False, "eos_token": st.EOS,
        "extra_special_tokens": {}, "model_max_length": 1000000000000000019884624838656,
        "pad_token": st.PAD, "tokenizer_class": "TikTokenTokenizer", "unk_token": st.UNK,
    } | fields
    path = Path(directory) / "tokenizer_config.json"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
