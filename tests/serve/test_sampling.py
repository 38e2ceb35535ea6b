"""The sampler on crafted distributions: filters, penalties, seeds, logprobs, parameter names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve import sampling
from serve.sampling import SamplingParams

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)


def _rows(params_list, seeds=None, steps=None):
    floats, ints = [], []
    for i, p in enumerate(params_list):
        f, n = sampling.row_values(p, seeds[i] if seeds else 0, steps[i] if steps else 0)
        floats.append(f)
        ints.append(n)
    return jnp.asarray(floats, jnp.float32), jnp.asarray(ints, jnp.int32)


_sample = jax.jit(lambda logits, floats, ints, mask, counts: sampling.sample(
    logits, floats, ints, lambda: (mask, counts)))


def _draw(logits_bv, params_list, seeds=None, steps=None, mask=None, counts=None):
    floats, ints = _rows(params_list, seeds, steps)
    shape = np.shape(logits_bv)
    mask = np.zeros(shape, bool) if mask is None else mask
    counts = np.zeros(shape, np.int32) if counts is None else counts
    return jax.device_get(_sample(jnp.asarray(logits_bv, jnp.float32), floats, ints, mask,
                                  counts))


def _kept(**kw):
    """Tokens of PROBS that survive the filters (an isolated row, temperature 1)."""
    p = SamplingParams(**kw)
    out = sampling.filter_logits(jnp.asarray(LOGITS)[None], jnp.array([max(p.top_k, 0)]),
                                 jnp.array([p.top_p]), jnp.array([p.min_p]))
    return np.flatnonzero(np.isfinite(np.asarray(out[0]))).tolist()


def test_top_k_top_p_min_p_keep_the_right_tokens():
    assert _kept(top_k=2) == [0, 1]
    assert _kept(top_k=0) == _kept(top_k=-1) == [0, 1, 2, 3]
    # Mass before each sorted token: 0, 0.5, 0.8, 0.95; a token stays while that is < p.
    assert _kept(top_p=0.5) == [0]
    assert _kept(top_p=0.8) == [0, 1]
    assert _kept(top_p=0.81) == [0, 1, 2]
    # min_p is relative to the top probability: 0.25 * 0.5 = 0.125 keeps 0.5, 0.3, 0.15.
    assert _kept(min_p=0.25) == [0, 1, 2]
    assert _kept(min_p=0.7) == [0]
    # Filters compose in HF's order: top-p and min-p see the top-k survivors renormalised.
    assert _kept(top_k=3, top_p=0.9) == [0, 1, 2]
    assert _kept(top_k=2, min_p=0.6) == [0, 1]


def test_disabled_filters_are_exact_no_ops():
    logits = jax.random.normal(jax.random.key(0), (3, 1000)) * 5
    out = sampling.filter_logits(logits, jnp.zeros(3, jnp.int32), jnp.ones(3), jnp.zeros(3))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(logits))


def test_penalties():
    logits = np.array([[2.0, -2.0, 1.0, 0.5]], np.float32)
    mask = np.array([[True, True, False, False]])
    counts = np.array([[0, 0, 3, 0]], np.int32)
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.1)
    floats, _ = _rows([p])
    out = np.asarray(sampling.apply_penalties(jnp.asarray(logits), floats, mask, counts))
    # Seen tokens (prompt 0, 1; output 2): positive / 2, negative * 2; output token 2 also
    # pays presence 0.5 and frequency 3 * 0.1.
    np.testing.assert_allclose(out, [[1.0, -4.0, 0.5 - 0.5 - 0.3, 0.5]], rtol=1e-6)


def test_greedy_uses_penalised_logits_and_reports_raw_logprobs():
    logits = np.array([[3.0, 2.9, 0.0, 0.0]], np.float32)
    plain = _draw(logits, [SamplingParams(temperature=0, logprobs=2)])
    assert plain.tokens[0] == 0
    np.testing.assert_allclose(plain.logprobs[0], jax.nn.log_softmax(logits[0])[0], rtol=1e-6)
    assert plain.top_ids[0, :2].tolist() == [0, 1]
    penalised = _draw(logits, [SamplingParams(temperature=0, repetition_penalty=1.5)],
                      mask=np.array([[True, False, False, False]]))
    assert penalised.tokens[0] == 1
    np.testing.assert_allclose(penalised.logprobs[0], jax.nn.log_softmax(logits[0])[1],
                               rtol=1e-6)


def test_draws_follow_the_filtered_distribution():
    """Many seeds: frequencies match softmax(logits / T) restricted to the kept set."""
    n = 4000
    logits = np.tile(LOGITS, (n, 1))
    seeds = list(range(n))
    sharpened = PROBS ** 2 / (PROBS ** 2).sum()  # temperature 0.5: 0.68, 0.25, 0.06, 0.01
    for kw, expected in (
            (dict(temperature=1.0), PROBS),
            (dict(temperature=1.0, top_k=2), np.r_[PROBS[:2] / 0.8, 0, 0]),
            (dict(temperature=0.5, top_p=0.9), np.r_[sharpened[:2] / sharpened[:2].sum(), 0, 0]),
            (dict(temperature=1.0, min_p=0.5), np.r_[PROBS[:2] / 0.8, 0, 0])):
        out = _draw(logits, [SamplingParams(**kw)] * n, seeds=seeds)
        freq = np.bincount(out.tokens, minlength=4) / n
        np.testing.assert_allclose(freq, expected, atol=0.03, err_msg=str(kw))


def test_seeded_draws_depend_on_seed_and_step_only():
    vocab = 64
    logits = jax.random.normal(jax.random.key(1), (1, vocab)) * 2
    p = SamplingParams(temperature=1.0, top_p=0.95)
    alone = [_draw(logits, [p], seeds=[7], steps=[s]).tokens[0] for s in range(8)]
    assert len(set(alone)) > 1  # the step changes the draw
    # Same seed and steps in row 3 of a batch whose other rows differ in every parameter.
    others = [SamplingParams(temperature=0), SamplingParams(temperature=2.0, top_k=3),
              SamplingParams(temperature=0.7, repetition_penalty=1.3)]
    batch_logits = np.concatenate([np.asarray(jax.random.normal(jax.random.key(2), (3, vocab))),
                                   np.asarray(logits)])
    for s in range(8):
        out = _draw(batch_logits, others + [p], seeds=[1, 2, 3, 7], steps=[5, 0, 9, s])
        assert out.tokens[3] == alone[s]


def test_parameter_names_and_validation():
    assert SamplingParams.from_kwargs(max_tokens=5).max_new_tokens == 5
    assert SamplingParams.from_kwargs(max_new_tokens=5, max_tokens=5).max_new_tokens == 5
    assert SamplingParams.from_kwargs(stop="x").stop == ("x",)
    with pytest.raises(ValueError, match="unsupported sampling parameter 'do_sample'"):
        SamplingParams.from_kwargs(do_sample=True)
    with pytest.raises(ValueError, match="different values"):
        SamplingParams.from_kwargs(max_new_tokens=5, max_tokens=6)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=1.5),
                dict(repetition_penalty=0), dict(n=0), dict(logprobs=21), dict(max_tokens=0),
                dict(seed=-1)):
        with pytest.raises(ValueError):
            SamplingParams.from_kwargs(**bad)
