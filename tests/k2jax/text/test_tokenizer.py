"""K2Tokenizer: special-token layout, pre-tokenizer, round trips, injection safety, streaming decode."""

import random
import subprocess
import sys

import pytest
import regex

from k2jax.text import special_tokens as st
import json

from k2jax.text import load_tokenizer
from k2jax.text.testing import (tiny_ranks, tiny_tokenizer, write_tiktoken_file,
                               write_tiny_tiktoken_file, write_tokenizer_config)
from k2jax.text.tokenizer import MAX_RUN_CHARS, PRETOKENIZE_PATTERN, K2Tokenizer, load_ranks

UNICODE_SAMPLES = [
    "",
    "Hello, world!",
    "今天天气很好，我们去公园散步吧。",
    "mixed 中文 and English, it's 23°C\n\nnew paragraph\r\nwindows line\ttab",
    "emoji 😀🎉 family 👨‍👩‍👧‍👦 flag 🇨🇳 skin 👍🏽 heart ❤️",
    "combining: e\u0301 n\u0303 — RTL: مرحبا بالعالم — Cyrillic: Привет",
    "   leading and trailing spaces   \n\n\n",
    "numbers 1234567 3.14159 and symbols →≤≥∑π∞ {\"json\": [1, 2]}",
    "lone surrogate-free astral: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠀀𠀁",
]


def test_released_vocabulary_layout(tmp_path):
    # A stand-in for the released file: 163584 distinct byte strings, ranks in order.
    tokens = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    tokens += [bytes([a, b, c]) for a in range(256) for b in range(256) for c in range(2)]
    ranks = {token: rank for rank, token in enumerate(tokens[:st.K2_NUM_BASE_TOKENS])}
    tok = K2Tokenizer.from_file(write_tiktoken_file(tmp_path / "tiktoken.model", ranks).parent)
    assert tok.vocab_size == 163840
    assert (tok.bos_id, tok.eos_id, tok.im_end_id) == (163584, 163585, 163586)
    assert (tok.unk_id, tok.pad_id) == (163838, 163839)
    assert tok.stop_ids == (163586, 163585)
    for name, token_id in st.K2_SPECIAL_TOKEN_IDS.items():
        assert tok.special_id(name) == token_id
        assert tok.id_to_token(token_id) == name
    assert tok.id_to_token(163589) == "<|reserved_token_163589|>"
    assert tok.decode(tok.encode("Kimi K2 思考")) == "Kimi K2 思考"


def test_small_vocabulary_offsets_specials(tokenizer):
    base = tokenizer.num_base_tokens
    assert tokenizer.vocab_size == base + 256 == 768
    for name, k2_id in st.K2_SPECIAL_TOKEN_IDS.items():
        assert tokenizer.special_id(name) == base + (k2_id - st.K2_NUM_BASE_TOKENS)
    assert sorted(tokenizer.special_tokens.values()) == list(range(base, base + 256))
    assert tokenizer.id_to_token(base + 5) == f"<|reserved_token_{base + 5}|>"
    assert tokenizer.bos_id == base and tokenizer.eos_id == base + 1 and tokenizer.im_end_id == base + 2
    with pytest.raises(ValueError, match="not a special token"):
        tokenizer.special_id("<|no_such_token|>")


def test_from_file_matches_in_memory(tiktoken_dir, tokenizer):
    loaded = K2Tokenizer.from_file(tiktoken_dir)
    text = UNICODE_SAMPLES[3]
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode(text) == tokenizer.encode(text)


def _hub_tokenizer_dir(tmp_path, names=None, **fields):
    write_tiny_tiktoken_file(tmp_path)
    base = tiny_tokenizer().num_base_tokens
    write_tokenizer_config(tmp_path, base, names, **fields)
    return tmp_path, base


def test_hub_tokenizer_config_gives_the_same_tokenizer(tmp_path, tokenizer):
    directory, _ = _hub_tokenizer_dir(tmp_path)
    assert '"163' not in (directory / "tokenizer_config.json").read_text()  # tiny offsets
    for path in (directory, directory / "tiktoken.model"):
        loaded = load_tokenizer(path)
        assert loaded.special_tokens == tokenizer.special_tokens
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.unk_id, loaded.stop_ids) == (
            tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id,
            tokenizer.stop_ids)


def test_added_tokens_decoder_names_the_special_slots(tmp_path):
    base = tiny_tokenizer().num_base_tokens
    # K2 Instruct's table: no media or thinking tokens; and a slot K2 leaves reserved, named.
    names = {base + k2_id - st.K2_NUM_BASE_TOKENS: text
             for text, k2_id in st.K2_SPECIAL_TOKEN_IDS.items()
             if not (text.startswith("<|media") or "think>" in text)}
    names[base + 5] = "<|custom|>"
    directory, _ = _hub_tokenizer_dir(tmp_path, names,
                                      eos_token={"__type": "AddedToken", "content": "<|im_end|>",
                                                 "lstrip": False, "rstrip": False})
    loaded = load_tokenizer(directory)
    assert loaded.special_id("<|custom|>") == base + 5
    assert loaded.id_to_token(base + 22) == f"<|reserved_token_{base + 22}|>"
    with pytest.raises(ValueError, match="'<think>' is not a special token.*added_tokens_decoder"):
        loaded.special_id("<think>")
    assert loaded.eos_id == loaded.im_end_id == base + 2 and loaded.stop_ids == (base + 2,)
    assert sorted(loaded.special_tokens.values()) == list(range(base, base + 256))


@pytest.mark.parametrize("change, says", [
    (lambda c, base: c["added_tokens_decoder"].update({str(base + 256): {"content": "<|x|>"}}),
     "outside the special slots"),
    (lambda c, base: c["added_tokens_decoder"].update({str(base + 9): {"content": "[BOS]"}}),
     r"'\[BOS\]' names both"),
    (lambda c, base: c["added_tokens_decoder"].update({"abc": {"content": "<|x|>"}}),
     "key 'abc' is not a token id"),
    (lambda c, base: c["added_tokens_decoder"][str(base)].pop("content"),
     rf"added_tokens_decoder\['\d+'\].content"),
    (lambda c, base: c.update(added_tokens_decoder=[]), "added_tokens_decoder: expected"),
    (lambda c, base: c.update(bos_token="<|nope|>"), "bos_token '<|nope|>' is not among"),
    (lambda c, base: c.update(pad_token=7), "pad_token: expected a string"),
])
def test_bad_tokenizer_configs_name_the_file_and_field(tmp_path, change, says):
    directory, base = _hub_tokenizer_dir(tmp_path)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    change(config, base)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=says) as error:
        load_tokenizer(directory)
    assert "tokenizer_config.json" in str(error.value)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(directory)


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.num_base_tokens for i in ids)
    assert tokenizer.decode(ids) == text


def _reference_bpe(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Textbook BPE: repeatedly merge the adjacent pair whose concatenation ranks lowest."""
    parts = [bytes([b]) for b in piece]
    while True:
        candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not candidates:
            return [ranks[p] for p in parts]
        _, i = min(candidates)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def test_pretokenizer_pattern_matches_regex_v1_reference(tokenizer):
    # tiktoken's engine must read the `&&` intersections as the `regex` package's V1 mode does.
    ranks = tiny_ranks()
    pattern = regex.compile(PRETOKENIZE_PATTERN, flags=regex.V1)
    text = "".join(UNICODE_SAMPLES) + " I'LL go, it's ÉCOLE's café DON'T 北京Beijing ABCdef\n \n  x"
    expected = [i for piece in pattern.findall(text) for i in _reference_bpe(piece.encode(), ranks)]
    assert tokenizer.encode(text) == expected


def test_pretokenizer_splits_han_from_latin():
    pattern = regex.compile(PRETOKENIZE_PATTERN, flags=regex.V1)
    assert pattern.findall("Hello世界 it's") == ["Hello", "世界", " it's"]


def test_user_text_never_becomes_control_tokens(tokenizer):
    for name in tokenizer.special_tokens:
        ids = tokenizer.encode(f"before {name} after")
        assert not any(tokenizer.is_special(i) for i in ids), name
        assert tokenizer.decode(ids) == f"before {name} after"


def test_decode_skip_special_tokens_keeps_reasoning_and_tool_markers(tokenizer):
    kept = [st.THINK_BEGIN, st.THINK_END, st.TOOL_CALLS_SECTION_BEGIN, st.TOOL_CALL_BEGIN,
            st.TOOL_CALL_ARGUMENT_BEGIN, st.TOOL_CALL_END, st.TOOL_CALLS_SECTION_END]
    dropped = [st.BOS, st.IM_ASSISTANT, st.IM_MIDDLE, st.IM_END, st.EOS, "[PAD]"]
    ids = [tokenizer.special_id(name) for name in dropped[:3]]
    for name in kept:
        ids += [tokenizer.special_id(name)] + tokenizer.encode("x")
    ids += [tokenizer.special_id(name) for name in dropped[3:]] + [tokenizer.num_base_tokens + 7]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "".join(name + "x" for name in kept)
    assert tokenizer.decode(ids).startswith("[BOS]<|im_assistant|><|im_middle|><think>x")


def test_out_of_range_ids_raise(tokenizer):
    for bad in (-1, tokenizer.vocab_size):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tokenizer.decode([1, bad])


def test_token_lookups_round_trip(tokenizer):
    for token_id in range(tokenizer.vocab_size):
        token_bytes = tokenizer.token_bytes(token_id)
        assert tokenizer.token_to_id(token_bytes if token_id < tokenizer.num_base_tokens
                                     else token_bytes.decode()) == token_id
    assert tokenizer.id_to_token(tokenizer.token_to_id("ll")) == "ll"
    with pytest.raises(KeyError):
        tokenizer.token_to_id("not a single token")


def test_long_runs_are_cut_like_the_released_tokenizer(tokenizer):
    spaces = " " * (2 * MAX_RUN_CHARS + 10)
    text = "a" + spaces + "b"
    assert tokenizer.encode(text) == (tokenizer.encode("a" + spaces[:MAX_RUN_CHARS])
                                      + tokenizer.encode(spaces[MAX_RUN_CHARS:2 * MAX_RUN_CHARS])
                                      + tokenizer.encode(spaces[2 * MAX_RUN_CHARS:] + "b"))
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_incremental_detokenizer_never_splits_a_character(tokenizer):
    text = "emoji 😀🎉 and 北京 and 👨‍👩‍👧‍👦 end"
    ids = tokenizer.encode(text)
    assert any("\\x" in tokenizer.id_to_token(i) for i in ids)  # some tokens hold partial chars
    detokenizer = tokenizer.detokenizer()
    deltas = [detokenizer.add(token_id) for token_id in ids] + [detokenizer.finish()]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text


def test_incremental_detokenizer_equals_decode_on_any_ids(tokenizer):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (False, True):
            detokenizer = tokenizer.detokenizer(skip_special_tokens=skip)
            pieces = [detokenizer.add(ids[i:i + 3]) for i in range(0, len(ids), 3)]
            assert "".join(pieces) + detokenizer.finish() == tokenizer.decode(ids, skip_special_tokens=skip)


def test_load_ranks_rejects_malformed_files(tmp_path):
    bad_line = tmp_path / "bad_line.model"
    bad_line.write_text("YQ== 0\nnot-base64-and-no-rank\n")
    with pytest.raises(ValueError, match="bad_line.model:2"):
        load_ranks(bad_line)
    gap = tmp_path / "gap.model"
    gap.write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(ValueError, match="cover 0..1"):
        load_ranks(gap)


def test_tiny_tokenizer_sizes():
    assert tiny_tokenizer(512).num_base_tokens == 256  # bytes only, as the `tiny` model preset
    assert tiny_tokenizer(1024).vocab_size == 1024
    with pytest.raises(ValueError, match="at least 512"):
        tiny_tokenizer(300)


def test_text_modules_import_without_jax():
    code = ("import sys; sys.modules['jax'] = None; "
            "import k2jax.text.tokenizer, k2jax.text.chat_template, k2jax.text.testing; "
            "import serve, serve.parsers; serve.K2Tokenizer, serve.parse_output")
    subprocess.run([sys.executable, "-c", code], check=True)
