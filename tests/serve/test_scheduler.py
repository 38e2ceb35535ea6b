"""Continuous batching: requests arriving mid-stream, preemption and prefix sharing all give
each request the tokens it gets alone."""

import numpy as np
import pytest

import k2jax
from serve.engine import Engine
from serve.paged_cache import PageAllocator
from serve.sampling import SamplingParams
from tests.hf_reference import params_from_hf_model, random_hf_model

CONFIG = k2jax.ModelConfig.preset("tiny").replace(dtype="float32")
ENGINE = dict(max_batch=4, max_seq_len=64, page_size=8, prefill_chunk=16)
RNG = np.random.default_rng(0)


def _prompt(n):
    return RNG.integers(3, CONFIG.vocab_size, n).tolist()


# (arrival step, prompt, params): greedy and seeded sampling with every filter and penalty,
# a prompt prefilled in two chunks, more requests than slots.
REQUESTS = [
    (0, _prompt(5), SamplingParams(max_new_tokens=12, temperature=0)),
    (0, _prompt(14), SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=1)),
    (1, _prompt(3), SamplingParams(max_new_tokens=15, temperature=0, repetition_penalty=1.3)),
    (3, _prompt(20), SamplingParams(max_new_tokens=8, min_p=0.05, presence_penalty=0.5, seed=2)),
    (3, _prompt(9), SamplingParams(max_new_tokens=6, temperature=0)),
    (6, _prompt(7), SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20,
                                   frequency_penalty=0.3, seed=3)),
]


@pytest.fixture(scope="module")
def model():
    return CONFIG, params_from_hf_model(CONFIG, random_hf_model(CONFIG, seed=2))


def _run(engine, requests):
    """Adds each request at its arrival step; returns token ids per request, in order."""
    pending = sorted(enumerate(requests), key=lambda item: item[1][0])
    ids, step, busiest = {}, 0, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][1][0] <= step:
            index, (_, prompt, params) = pending.pop(0)
            ids[index] = engine.add_request(prompt, params)
        engine.step()
        busiest = max(busiest, len(engine.scheduler.running) + len(engine.scheduler.waiting))
        step += 1
    results = [engine.pop_result(ids[i]) for i in range(len(requests))]
    return [[o.token_ids for o in r.outputs] for r in results], busiest


def _alone(model, prompt, params):
    """The tokens of a request's (first) completion when it has the engine to itself."""
    tokens, _ = _run(Engine(*model, **ENGINE), [(0, prompt, params)])
    return tokens[0][0]


def _finish(engine):
    while engine.has_unfinished():
        engine.step()


def test_requests_arriving_mid_stream_get_their_solo_tokens(model):
    engine = Engine(*model, **ENGINE)
    batched, busiest = _run(engine, REQUESTS)
    assert busiest > ENGINE["max_batch"]  # some requests had to wait for a slot
    for (_, prompt, params), got in zip(REQUESTS, batched):
        assert got == [_alone(model, prompt, params)]
    assert engine.allocator.num_free == engine.allocator.num_pages  # everything released


def test_preempted_sequences_resume_their_streams(model):
    # 12 pages of 8 tokens for three sequences growing to 40 tokens (5 pages) each.
    requests = [(0, _prompt(10), SamplingParams(max_new_tokens=30, temperature=0)),
                (0, _prompt(10), SamplingParams(max_new_tokens=30, temperature=0.9, seed=4)),
                (0, _prompt(10), SamplingParams(max_new_tokens=30, temperature=0))]
    engine = Engine(*model, num_pages=12, **ENGINE)
    batched, _ = _run(engine, requests)
    assert engine.stats["preemptions"] > 0
    for (_, prompt, params), got in zip(requests, batched):
        assert got == [_alone(model, prompt, params)]


def test_identical_prefixes_share_pages(model):
    prefix = _prompt(20)  # two full pages of 8
    a, b = prefix + [11, 12, 13], prefix + [14, 15]
    engine = Engine(*model, **ENGINE)
    first = engine.add_request(a, SamplingParams(max_new_tokens=4, temperature=0))
    second = engine.add_request(b, SamplingParams(max_new_tokens=4, temperature=0))
    engine.step()  # b waits a step so that it can reuse a's pages once written
    engine.step()
    seq_a, seq_b = (engine._requests[r][1][0] for r in (first, second))
    assert seq_a.pages[:2] == seq_b.pages[:2] and seq_a.pages[2] != seq_b.pages[2]
    assert engine.allocator.refcount(seq_a.pages[0]) == 2
    _finish(engine)
    assert engine.stats["prefill_tokens"] == len(a) + len(b) - 16
    for request, prompt in ((first, a), (second, b)):
        params = SamplingParams(max_new_tokens=4, temperature=0)
        assert engine.pop_result(request).token_ids == _alone(model, prompt, params)
    # Released pages stay indexed: a later request with the prefix prefills only its tail.
    engine.add_request(prefix + [16], SamplingParams(max_new_tokens=1, temperature=0))
    _finish(engine)
    assert engine.stats["prefill_tokens"] == len(a) + len(b) - 16 + 5
    # n completions share their prompt; completion i draws with seed + i.
    request = engine.add_request(a, SamplingParams(max_new_tokens=5, n=2, seed=7))
    _finish(engine)
    outputs = engine.pop_result(request).outputs
    for out, seed in zip(outputs, (7, 8)):
        assert out.token_ids == _alone(model, a, SamplingParams(max_new_tokens=5, seed=seed))


def test_allocator_never_matches_a_stale_chain():
    alloc = PageAllocator(num_pages=3, page_size=2)
    pages = alloc.allocate(2)
    alloc.register_prefix([1, 2, 3, 4], pages)
    alloc.release(pages)
    assert alloc.num_free == 3  # released indexed pages are cached, still allocatable
    assert alloc.match_prefix([1, 2, 3, 4], 3) == pages[:1]  # whole pages within the limit
    alloc.release(pages[:1])
    assert alloc.match_prefix([1, 2, 3, 4, 5], 5) == pages
    alloc.release(pages)  # pages[0] is now the least recently released
    assert alloc.allocate(2) == [2, pages[0]]  # the free page first, then the oldest cached
    assert alloc.allocate(2) is None
    # pages[0] now holds other content; its old child must not be found under it.
    alloc.register_prefix([5, 6], [pages[0]])
    assert alloc.match_prefix([5, 6, 3, 4], 4) == [pages[0]]


def _byte_level(vocab):
    """A byte-level detokenizer (as tiktoken's): ids -> their bytes -> UTF-8 with U+FFFD."""
    return lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def _leading_space_dropped(vocab):
    """A sentencepiece-like one: the text's first piece loses its leading space."""
    decode = _byte_level(vocab)
    return lambda ids: decode(ids).removeprefix(" ")


@pytest.mark.parametrize("make", [_byte_level, _leading_space_dropped])
def test_incremental_text_equals_a_full_decode_and_reads_few_tokens(make):
    # Pieces that split multi-byte characters (é, 世, an emoji) across tokens.
    vocab = [b" a", b"\xc3", b"\xa9", b"\xe4\xb8", b"\x96", b"\xf0\x9f", b"\x98", b"\x80",
             b" stop", b"!", b"\xff"]
    decode = make(vocab)
    decoded_lengths = []

    def counting(ids):
        decoded_lengths.append(len(ids))
        return decode(ids)

    ids = RNG.integers(0, len(vocab), 300).tolist()
    seq = _sequence(SamplingParams(max_new_tokens=1000))
    for step, token in enumerate(ids, 1):
        seq.append(token, 0.0, None, counting, max_seq_len=10_000)
        assert seq.text == decode(ids[:step])
    # Each step decodes the unsettled tail and a few tokens of context, not the whole output
    # (which would be 300 * 301 / 2 = 45150 tokens in all).
    assert sum(decoded_lengths) < 20 * len(ids), sum(decoded_lengths)


def _sequence(params):
    from serve.scheduler import Sequence
    return Sequence(request_id=0, index=0, prompt=[1], params=params, seed=0,
                    stop_ids=frozenset(), arrival=0)
