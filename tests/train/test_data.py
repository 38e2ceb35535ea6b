"""Data: packing with segment ids and restarting positions, deterministic order, exact resume
from a saved position, chat loss masks on assistant turns only."""

import json

import numpy as np
import pytest

from k2jax.text import chat_template
from k2jax.text import special_tokens as st
from k2jax.text.chat_formats import chat_format
from train import data


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def corpus(tmp_path):
    texts = [{"text": "x" * n} for n in (3, 10, 1, 25, 7, 0, 14)]
    return data.JsonlCorpus(_write(tmp_path / "c.jsonl", texts), data.byte_tokenizer())


def test_rows_pack_documents_with_segments_and_restarting_positions(corpus):
    tok = data.byte_tokenizer()
    rows = data.Packer(corpus, seq_len=16, seed=0).rows(6)
    assert all(rows[k].shape == (6, 16) for k in data.BATCH_FIELDS)
    for r in range(6):
        seg, pos = rows["segment_ids"][r], rows["positions"][r]
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(seg > 0)
        starts = np.flatnonzero(np.diff(seg, prepend=0))
        assert np.all(pos[starts] == 0)
        within = np.diff(seg) == 0
        assert np.all(np.diff(pos)[within] == 1)
        # Targets are the next token of the same document.
        same = within & (rows["tokens"][r, 1:] != tok.bos_id)
        np.testing.assert_array_equal(rows["targets"][r, :-1][same], rows["tokens"][r, 1:][same])
    assert set(np.unique(rows["tokens"])) <= {tok.bos_id, tok.eos_id, ord("x")}
    np.testing.assert_array_equal(rows["weights"], 1.0)


def test_whole_documents_pad_rows_instead_of_splitting(corpus):
    """Pair counts are 4, 11, 2, 26, 8, 1, 15: with rows of 16, only the 26-pair document is
    longer than a row, so it alone is split; every other document lies in one row."""
    seq_len, rows_wanted = 16, 12
    rows = data.Packer(corpus, seq_len=seq_len, seed=0, whole_documents=True).rows(rows_wanted)
    order = np.concatenate([np.random.default_rng([0, epoch]).permutation(len(corpus))
                            for epoch in range(3)])
    pieces = []
    for r in range(rows_wanted):
        seg = rows["segment_ids"][r]
        used = int((seg > 0).sum())
        assert np.all(seg[:used] > 0) and np.all(seg[used:] == 0)  # padding only at the end
        assert np.all(rows["weights"][r, used:] == 0)
        pieces += [int((seg == s).sum()) for s in range(1, int(seg.max()) + 1)]
    expected, free = [], seq_len  # pieces in order; what is left of the current row
    for i in order:
        pairs = len(corpus.document(int(i)).tokens) - 1
        if free < pairs <= seq_len:
            free = seq_len
        while pairs:
            take = min(free, pairs)
            expected.append(take)
            pairs, free = pairs - take, free - take or seq_len
    assert pieces == expected[:len(pieces)] and len(pieces) > len(corpus)
    # A row padded because the next document did not fit: the row after starts with it whole.
    split = data.Packer(corpus, seq_len=seq_len, seed=0).rows(rows_wanted)
    assert (split["segment_ids"] > 0).all() and not (rows["segment_ids"] > 0).all()


def test_one_epoch_packs_every_pair_once_in_shuffled_order(corpus):
    tok = data.byte_tokenizer()
    pairs = sum(len(corpus.document(i).tokens) - 1 for i in range(len(corpus)))
    packer = data.Packer(corpus, seq_len=pairs, seed=3)
    row = packer.rows(1)
    assert packer.position == data.DataPosition(epoch=1, index=0, offset=0)
    assert int((row["tokens"] == tok.bos_id).sum()) == int((row["targets"] == tok.eos_id).sum())
    assert int((row["targets"] == tok.eos_id).sum()) == len(corpus)
    lengths = [int((row["segment_ids"] == s).sum()) for s in range(1, len(corpus) + 1)]
    order = np.random.default_rng([3, 0]).permutation(len(corpus))
    assert lengths == [len(corpus.document(int(i)).tokens) - 1 for i in order]


def test_order_is_deterministic_and_resumes_exactly(corpus):
    first = data.Packer(corpus, seq_len=12, seed=7)
    a = first.rows(5)
    saved = json.loads(json.dumps(first.state()))
    b = first.rows(9)
    again = data.Packer(corpus, seq_len=12, seed=7)
    np.testing.assert_array_equal(again.rows(5)["tokens"], a["tokens"])
    resumed = data.Packer(corpus, seq_len=12, seed=7)
    resumed.restore(saved)
    continued = resumed.rows(9)
    for key in data.BATCH_FIELDS:
        np.testing.assert_array_equal(continued[key], b[key])
    other = data.Packer(corpus, seq_len=12, seed=8).rows(14)["tokens"]
    assert not np.array_equal(other, np.concatenate([a["tokens"], b["tokens"]]))
    with pytest.raises(data.DataError, match="does not match"):
        data.Packer(corpus, seq_len=16, seed=7).restore(saved)


def test_chat_trains_the_final_reasoning_chain_as_inference_renders_it():
    tok = data.byte_tokenizer()
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "use the tool",
         "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "easy"},
    ]
    doc = data.encode_chat(tok, messages)
    prompt = chat_template.apply_chat_template(tok, messages[:-1], add_generation_prompt=True)
    np.testing.assert_array_equal(doc.tokens[:len(prompt.token_ids)], prompt.token_ids)
    trained = tok.decode(doc.tokens[doc.mask == 1].tolist())
    assert trained == ("<think>use the tool</think><|tool_calls_section_begin|><|tool_call_begin|>"
                       'functions.get_weather:0<|tool_call_argument_begin|>{"city":"Paris"}'
                       "<|tool_call_end|><|tool_calls_section_end|><|im_end|>"
                       "<think>easy</think>It is sunny.<|im_end|>")
    context = tok.decode(doc.tokens[doc.mask == 0].tolist())
    assert "<think></think>Hello!" in context and "greet" not in context
    starts = np.flatnonzero(np.diff(doc.mask, prepend=0) == 1)
    assert all(doc.tokens[s - 1] == tok.special_id(st.IM_MIDDLE) for s in starts)


def test_chat_in_a_k25_format_trains_after_the_prefilled_think():
    tok = data.byte_tokenizer()
    tok.chat_format = chat_format("k2.5")
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello!", "reasoning": "greet"}]
    doc = data.encode_chat(tok, messages)
    prompt = chat_template.apply_chat_template(tok, messages[:1], add_generation_prompt=True)
    assert prompt.text.endswith("<|im_middle|><think>")
    np.testing.assert_array_equal(doc.tokens[:len(prompt.token_ids)], prompt.token_ids)
    assert tok.decode(doc.tokens[len(prompt.token_ids):].tolist()) == "greet</think>Hello!<|im_end|>"


def test_chat_ending_in_a_tool_call_trains_the_open_chain():
    tok = data.byte_tokenizer()
    messages = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                {"role": "assistant", "content": "", "reasoning_content": "r",
                 "tool_calls": [{"id": "functions.f:0", "type": "function",
                                 "function": {"name": "f", "arguments": "{}"}}]}]
    doc = data.encode_chat(tok, messages)
    full = chat_template.apply_chat_template(tok, messages, add_generation_prompt=False)
    np.testing.assert_array_equal(doc.tokens, full.token_ids)
    assert tok.decode(doc.tokens[doc.mask == 1].tolist()).startswith("<think>r</think>")
    with pytest.raises(ValueError):
        data.encode_chat(tok, [{"role": "assistant", "content": 3}])


def test_record_kinds_and_errors(tmp_path):
    tok = data.byte_tokenizer()
    doc = data.encode_record({"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, tok)
    np.testing.assert_array_equal(doc.mask, [0, 1, 1])
    path = _write(tmp_path / "bad.jsonl", [{"text": "ok"}, {"prompt": "?"}])
    corpus = data.JsonlCorpus(path, tok)
    with pytest.raises(data.DataError, match="bad.jsonl:2: a record needs"):
        corpus.document(1)
    with pytest.raises(data.DataError, match="outside"):
        data.encode_record({"input_ids": [tok.vocab_size]}, tok)
    with pytest.raises(data.DataError, match="no such file"):
        data.JsonlCorpus(tmp_path / "missing.jsonl", tok)
    empty = data.JsonlCorpus(_write(tmp_path / "short.jsonl", [{"input_ids": [1]}]), tok)
    with pytest.raises(data.DataError, match="no document has two tokens"):
        data.Packer(empty, seq_len=4, seed=0).rows(1)


def test_batch_streams_split_over_processes_build_the_same_batch(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"text": "w" * n} for n in range(3, 40)])
    corpus = data.JsonlCorpus(path, data.byte_tokenizer())
    whole = data.BatchStreams(corpus, 16, seed=3, batch_size=4)
    halves = [data.BatchStreams(corpus, 16, seed=3, batch_size=4, rows=rows)
              for rows in ({0, 2}, {1, 3})]
    for _ in range(12):  # past an epoch of every stream
        expected = whole.next_batch()
        parts = [h.next_batch() for h in halves]
        for name in data.BATCH_FIELDS:
            np.testing.assert_array_equal(parts[0][name][[1, 3]], 0)  # not this process's rows
            combined = np.where(np.isin(np.arange(4), [0, 2])[:, None], parts[0][name],
                                parts[1][name])
            np.testing.assert_array_equal(combined, expected[name])
    positions = np.maximum(halves[0].positions(), halves[1].positions())
    assert whole.state() == halves[0].state(positions)
    with pytest.raises(ValueError, match="every stream"):
        halves[0].state()
    resumed = data.BatchStreams(corpus, 16, seed=3, batch_size=4, rows={1, 3})
    resumed.restore(whole.state())
    np.testing.assert_array_equal(resumed.next_batch()["tokens"][[1, 3]],
                                  whole.next_batch()["tokens"][[1, 3]])
    with pytest.raises(data.DataError, match="batch 4"):
        data.BatchStreams(corpus, 16, seed=3, batch_size=2).restore(whole.state())
