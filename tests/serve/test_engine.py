"""The engine: paged cache layout and size, logprobs, stop conditions, streaming, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import k2jax
from serve import paged_cache
from serve.engine import Engine
from serve.generation import generate, stream
from serve.sampling import SamplingParams
from tests.hf_reference import params_from_hf_model, random_hf_model

CONFIG = k2jax.ModelConfig.preset("tiny").replace(dtype="float32")
ENGINE = dict(max_batch=4, max_seq_len=64, page_size=8, prefill_chunk=16)
PROMPTS = [[5, 6, 7], list(range(10, 26))]


@pytest.fixture(scope="module")
def model():
    return CONFIG, params_from_hf_model(CONFIG, random_hf_model(CONFIG, seed=1))


def _text(ids):
    """A stand-in detokenizer: one letter per token."""
    return "".join(chr(ord("a") + t % 26) for t in ids)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float32"])
def test_cache_bytes_per_token_per_layer(dtype):
    pools = paged_cache.init_pages(CONFIG, num_pages=6, page_size=8, dtype=jnp.dtype(dtype))
    itemsize = jnp.dtype(dtype).itemsize
    expected = (CONFIG.kv_lora_rank + CONFIG.qk_rope_head_dim) * itemsize
    assert paged_cache.bytes_per_token_per_layer(pools) == expected
    total = sum(a.nbytes for pair in pools.values() for a in pair)
    assert total == expected * 6 * 8 * CONFIG.num_hidden_layers


def test_pages_write_and_read_in_position_order():
    """Entries land in the pages the table names, in any order, and read back by position;
    padding positions (-1) and unallocated pages are never written, and the slots of an
    unallocated page read at a position no query sees; other layers untouched."""
    layers, num_pages, size, c, r = 2, 5, 4, 3, 2
    table = jnp.array([[3, 0, 5], [1, 5, 5]])  # 5 = unallocated
    cache = paged_cache.PagedLatentCache(jnp.zeros((layers, num_pages, size, c)),
                                         jnp.zeros((layers, num_pages, size, r)), table)
    positions = jnp.array([[0, 3, 4, 6, -1], [2, 3, 4, -1, -1]])
    ckv = jnp.arange(2 * 5 * c, dtype=jnp.float32).reshape(2, 5, c) + 1
    kpe = -jnp.arange(2 * 5 * r, dtype=jnp.float32).reshape(2, 5, r) - 1
    written = cache.write(1, positions, ckv, kpe)
    ckv_bsc, kpe_bsr, kv_pos = written.read(1)
    never = int(jnp.iinfo(jnp.int32).max)
    assert ckv_bsc.shape == (2, 12, c) and kv_pos[0].tolist() == list(range(8)) + [never] * 4
    assert kv_pos[1].tolist() == list(range(4)) + [never] * 8
    np.testing.assert_array_equal(ckv_bsc[0, jnp.array([0, 3, 4, 6])], ckv[0, :4])
    np.testing.assert_array_equal(kpe_bsr[1, jnp.array([2, 3])], kpe[1, :2])
    # Row 1's position 4 falls in an unallocated page: dropped; pages 2 and 4 untouched.
    assert not np.any(ckv_bsc[1, 4:]) and not np.any(written.ckv[1, jnp.array([2, 4])])
    assert np.count_nonzero(np.asarray(written.ckv[1]).any(-1)) == 6
    assert not np.any(written.ckv[0]) and not np.any(written.kpe[0])


@pytest.mark.parametrize("rows, tokens", [(1, 1), (4, 1), (2, 16)], ids=["decode", "decode4",
                                                                        "prefill"])
def test_steps_update_the_pools_in_place(model, rows, tokens):
    """A step writes its slots where the pools lie: the compiled forward holds no copy of a
    pool, whose size (the whole page pool) would otherwise set the cost of every step."""
    from serve.engine import _forward
    config, params = model
    num_pages = 37  # a size nothing else in the model has
    pools = paged_cache.init_pages(config, num_pages, 8, jnp.float32)
    args = (config, k2jax.to_serving_layout(params), pools, jnp.zeros((rows, tokens), jnp.int32),
            jnp.zeros((rows, tokens), jnp.int32), jnp.zeros((rows, 4), jnp.int32),
            jnp.zeros((rows,), jnp.int32))
    hlo = _forward.lower(*args).compile().as_text()
    pool_shapes = {f"f32[{','.join(map(str, a.shape))}]" for pair in pools.values() for a in pair}
    copies = [line for line in hlo.splitlines()
              if " copy(" in line and any(f"= {shape}" in line for shape in pool_shapes)]
    assert not copies, copies[:2]


def test_fp8_pages_round_trip_and_saturate():
    cache = paged_cache.PagedLatentCache(jnp.zeros((1, 2, 4, 3), jnp.float8_e4m3fn),
                                         jnp.zeros((1, 2, 4, 2), jnp.float8_e4m3fn),
                                         jnp.array([[0, 1]]))
    ckv = jnp.array([[[0.1, -1.7, 1e4]]])
    ckv_bsc, _, _ = cache.write(0, jnp.array([[5]]), ckv, jnp.ones((1, 1, 2))).read(0)
    got = np.asarray(ckv_bsc[0, 5], np.float32)
    np.testing.assert_allclose(got[:2], [0.1, -1.7], rtol=0.07)
    assert got[2] == 448.0  # saturated, not NaN


def test_logprobs_equal_the_full_forward(model):
    config, params = model
    result, = generate(model, [PROMPTS[1]], max_new_tokens=6, temperature=0, logprobs=3,
                       **ENGINE)
    tokens = PROMPTS[1] + result.token_ids
    full = jax.nn.log_softmax(k2jax.logits(config, params, jnp.array([tokens]))[0], axis=-1)
    steps = np.arange(len(PROMPTS[1]) - 1, len(tokens) - 1)
    expected = np.asarray(full)[steps, result.token_ids]
    np.testing.assert_allclose(result.logprobs, expected, atol=1e-4)
    assert result.token_ids == np.asarray(full)[steps].argmax(-1).tolist()
    for top, row in zip(result.top_logprobs, np.asarray(full)[steps]):
        assert list(top) == np.argsort(-row)[:3].tolist()


def test_stop_conditions(model):
    greedy, = generate(model, [PROMPTS[0]], max_new_tokens=8, temperature=0, **ENGINE)
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 8
    # Stop on a token id: the stop token is the last one returned.
    stop_id = greedy.token_ids[3]
    first = greedy.token_ids.index(stop_id)
    by_id, = generate(model, [PROMPTS[0]], max_new_tokens=8, temperature=0,
                      stop_token_ids=[stop_id], **ENGINE)
    assert by_id.token_ids == greedy.token_ids[:first + 1] and by_id.finish_reason == "stop"
    # Stop on eos: the same, with the model's eos id.
    eos_config = CONFIG.replace(eos_token_id=stop_id)
    by_eos, = generate((eos_config, model[1]), [PROMPTS[0]], max_new_tokens=8, temperature=0,
                       **ENGINE)
    assert by_eos.token_ids == by_id.token_ids and by_eos.finish_reason == "stop"
    # Stop strings: the text is cut before the stop string.
    full_text = _text(greedy.token_ids)
    stop = full_text[4:6]
    engine = Engine(*model, detokenize=_text, **ENGINE)
    request = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=8, temperature=0,
                                                            stop=[stop]))
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    result = engine.pop_result(request)
    cut = full_text.index(stop)
    assert result.text == full_text[:cut] and result.finish_reason == "stop"
    assert result.token_ids == greedy.token_ids[:cut + len(stop)]
    assert "".join(d.text for d in deltas) == result.text
    assert [t for d in deltas for t in d.token_ids] == result.token_ids


def test_stream_yields_the_generate_tokens(model):
    kw = dict(max_new_tokens=5, temperature=0.9, top_k=50, seed=11, n=2, **ENGINE)
    results = generate(model, PROMPTS, **kw)
    streamed = {}
    finished = {}
    for delta in stream(model, PROMPTS, **kw):
        streamed.setdefault((delta.request_id, delta.index), []).extend(delta.token_ids)
        if delta.finish_reason:
            finished[delta.request_id, delta.index] = delta.finish_reason
    for i, result in enumerate(results):
        assert len(result.outputs) == 2
        assert result.outputs[0].token_ids != result.outputs[1].token_ids  # seeds 11 and 12
        for out in result.outputs:
            assert streamed[i, out.index] == out.token_ids
            assert finished[i, out.index] == out.finish_reason
    with pytest.raises(AttributeError, match="n=2"):
        results[0].token_ids


def test_context_limit_finishes_with_length(model):
    result, = generate(model, [list(range(1, 60))], max_new_tokens=20, temperature=0, **ENGINE)
    # 59 prompt tokens in a 64-token context: tokens at positions 59..63 can still be cached.
    assert result.finish_reason == "length" and len(result.token_ids) == 6


def test_bad_input_raises_before_running(model):
    with pytest.raises(ValueError, match="unsupported sampling parameter 'ignore_eos'"):
        generate(model, PROMPTS, ignore_eos=True)
    with pytest.raises(ValueError, match="stop strings need a detokenizer"):
        generate(model, PROMPTS, stop=["x"], **ENGINE)
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        generate(model, "hello")
    with pytest.raises(ValueError, match="token ids must be in"):
        generate(model, [[CONFIG.vocab_size]], **ENGINE)
    with pytest.raises(TypeError, match="checkpoint path or a"):
        generate(object(), PROMPTS)


def test_long_prompt_prefills_in_chunks_while_others_decode(model):
    """A 200-token prompt (13 chunks) admitted while 4 short requests decode: every engine step
    caches one more chunk of it and gives each short request its next token, and every output
    equals that request run alone."""
    config, params = model
    options = dict(max_seq_len=256, page_size=8, prefill_chunk=16, prefix_sharing=False)
    shorts = [[5, 6, 7], [9, 4], [30, 31, 32, 33], [11]]
    long_prompt = list(range(3, 3 + 200))
    sampling = SamplingParams(max_new_tokens=30, temperature=0)

    def alone(prompt):
        engine = Engine(config, params, max_batch=1, **options)
        request = engine.add_request(prompt, sampling)
        while engine.has_unfinished():
            engine.step()
        return engine.pop_result(request).token_ids

    engine = Engine(config, params, max_batch=5, **options)
    ids = [engine.add_request(p, sampling) for p in shorts]
    engine.step()  # prefills the short prompts, samples and decodes their first tokens
    long_id = engine.add_request(long_prompt, sampling)
    chunks = -(-len(long_prompt) // 16)
    for step in range(chunks):
        deltas = engine.step()
        produced = {d.request_id for d in deltas if d.token_ids}
        assert set(ids) <= produced, f"a short request stalled at step {step}"
        (prefilling,) = [s for s in engine.scheduler.running if len(s.prompt) == 200]
        # The step that caches the last chunk also samples the first token and decodes it.
        assert prefilling.num_cached == (16 * (step + 1) if step < chunks - 1 else 201)
    while engine.has_unfinished():
        engine.step()
    for request, prompt in zip(ids + [long_id], shorts + [long_prompt]):
        assert engine.pop_result(request).token_ids == alone(prompt)
