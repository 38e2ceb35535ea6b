"""Logit bias and constraint masks in the sampler, and the tool-call constraints' state machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve import constraints, sampling
from serve.sampling import SamplingParams, TokenMask

VOCAB = 40
LOGITS = np.linspace(2.0, -2.0, VOCAB, dtype=np.float32)  # greedy picks 0, then 1, ...

_sample = jax.jit(lambda logits, floats, ints, steering: sampling.sample(
    logits, floats, ints, lambda: (jnp.zeros(logits.shape, bool),
                                   jnp.zeros(logits.shape, jnp.int32)), steering))


def _bucket(n):
    return max(1, 1 << (max(n, 1) - 1).bit_length())


def _draw(params_list, masks=None, logits=None, seeds=None):
    rows = len(params_list)
    logits = np.tile(LOGITS, (rows, 1)) if logits is None else logits
    floats, ints = zip(*(sampling.row_values(p, (seeds or [0] * rows)[i], 0)
                         for i, p in enumerate(params_list)))
    steering = sampling.steering_arrays([p.logit_bias for p in params_list],
                                        masks or [None] * rows, VOCAB, _bucket)
    return jax.device_get(_sample(jnp.asarray(logits), jnp.asarray(floats, jnp.float32),
                                  jnp.asarray(ints, jnp.int32), steering))


def test_logit_bias_moves_the_greedy_token_and_leaves_logprobs_raw():
    greedy = SamplingParams(temperature=0)
    banned = SamplingParams(temperature=0, logit_bias={0: -100})
    forced = SamplingParams(temperature=0, logit_bias={"7": 100.0, 3: 1.0})
    out = _draw([greedy, banned, forced])
    assert out.tokens.tolist() == [0, 1, 7]
    raw = np.asarray(jax.nn.log_softmax(jnp.asarray(LOGITS)))
    np.testing.assert_allclose(out.logprobs, raw[[0, 1, 7]], rtol=1e-6)
    # +100 forces a token when sampling at temperature 1 too, whatever the seed.
    sampled = _draw([SamplingParams(temperature=1.0, logit_bias={5: 100})] * 8,
                    seeds=list(range(8)))
    assert sampled.tokens.tolist() == [5] * 8


def test_masks_allow_deny_and_bitmask_per_row():
    bits = np.zeros(-(-VOCAB // 32), np.uint32)
    bits[33 // 32] |= np.uint32(1 << (33 % 32))
    bits[3 // 32] |= np.uint32(1 << 3)
    masks = [None, TokenMask((9, 4)), TokenMask((0, 1, 2), deny=True),
             TokenMask(bitmask=bits.view(np.int32))]
    out = _draw([SamplingParams(temperature=0)] * 4, masks)
    assert out.tokens.tolist() == [0, 4, 3, 3]
    # Sampling stays inside the mask: only 33 and 3 are ever drawn from the bitmask row.
    many = _draw([SamplingParams(temperature=2.0)] * 64, [masks[3]] * 64,
                 seeds=list(range(64)))
    assert set(many.tokens.tolist()) == {3, 33}
    allowed = _draw([SamplingParams(temperature=2.0)] * 64, [masks[1]] * 64,
                    seeds=list(range(64)))
    assert set(allowed.tokens.tolist()) == {4, 9}


def test_logit_bias_validation():
    assert SamplingParams(logit_bias={"3": 1, 1: -2}).logit_bias == ((1, -2.0), (3, 1.0))
    for bad in ({1: 101}, {-1: 0}, {i: 0 for i in range(301)}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


# ---- the tool-call state machine, on token ids alone -----------------------------------------

MARKERS = constraints.Markers(think_begin=100, think_end=101, section_begin=102,
                              section_end=103, call_begin=104, argument_begin=105, call_end=106,
                              im_end=107, stops=(107, 108))


def _encode(text):
    return [200 + ord(c) for c in text]


def _walk(state, tokens):
    """The masks `state` gives before each token of `tokens` (which it is fed one by one)."""
    masks = []
    for i in range(len(tokens) + 1):
        masks.append(state.next_mask(tokens[:i]))
    return masks


def test_named_call_with_thinking_off_is_forced_to_the_end():
    spec = constraints.ToolCalls(MARKERS, _encode, ("ab",), required=True, max_calls=1,
                                 first_index=2, starts="content")
    call_id = _encode("functions.ab:2")
    tokens = [102, 104, *call_id, 105, 300, 301, 106, 103, 107]
    masks = _walk(spec(), tokens)
    assert masks[0] == TokenMask((102,)) and masks[1] == TokenMask((104,))
    for k, token in enumerate(call_id):
        assert masks[2 + k] == TokenMask((token,))
    assert masks[2 + len(call_id)] == TokenMask((105,))
    arguments = masks[3 + len(call_id)]
    assert arguments.deny and 106 not in arguments.ids and {107, 108, 104} <= set(arguments.ids)
    assert masks[-3] == TokenMask((103,)) and masks[-2] == TokenMask((107,))
    assert masks[-1] is None


def test_required_call_reasons_first_and_chooses_among_names():
    spec = constraints.ToolCalls(MARKERS, _encode, ("ab", "ac"), required=True)
    state = spec()
    assert state.next_mask([]) == TokenMask((100, 102))
    reasoning = [100, 250, 251]
    assert state.next_mask(reasoning) == TokenMask((107, 108, 104, 103), deny=True)
    after = reasoning + [101]
    assert state.next_mask(after) == TokenMask((102,))
    prefix = after + [102, 104, *_encode("functions.a")]
    assert state.next_mask(prefix) == TokenMask(tuple(sorted(_encode("bc"))))
    one_call = prefix + _encode("b:0") + [105, 300, 106]
    assert state.next_mask(one_call) == TokenMask((104, 103))  # parallel calls allowed
    second = one_call + [104, *_encode("functions.ac:")]
    assert state.next_mask(second) == TokenMask(tuple(_encode("1")))  # IDX counts on


def test_one_call_only_closes_the_section_after_the_first_call():
    spec = constraints.ToolCalls(MARKERS, _encode, None, required=False, max_calls=1)
    state = spec()
    free = [250, 102, 104, 251, 105, 252]
    assert all(mask is None for mask in _walk(state, free))
    assert state.next_mask(free + [106]) == TokenMask((103,))
    assert state.next_mask(free + [106, 103]) == TokenMask((107,))


def test_tool_choice_none_denies_the_section():
    from k2jax.text.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    factory = constraints.for_tool_choice(tokenizer, "none", None, True, "x", 0)
    mask = factory().next_mask([])
    assert mask.deny and tokenizer.special_id("<|tool_calls_section_begin|>") in mask.ids
    assert constraints.for_tool_choice(tokenizer, "auto", [{"function": {"name": "f"}}], True,
                                       "x", 0) is None
    assert constraints.prompt_starts("a<think></think>") == "content"
    assert constraints.prompt_starts("a<think>") == "reasoning"


def test_json_object_reasons_first_then_allows_only_json():
    from k2jax.text.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    think, end_think = tokenizer.special_id("<think>"), tokenizer.special_id("</think>")

    def allowed(mask):
        return {i for i in range(tokenizer.vocab_size)
                if (int(mask.bitmask[i // 32]) >> (i % 32)) & 1}

    def texts(mask):
        return {tokenizer.id_to_token(i) for i in allowed(mask)}

    state = constraints.JsonObject(tokenizer, "turn")()
    first = texts(state.next_mask([]))
    assert {"{", "<think>"} <= first and all(t.startswith(("{", "<think>")) for t in first)
    reasoning = [think, *tokenizer.encode("hmm")]
    mask = state.next_mask(reasoning)
    assert mask.deny and tokenizer.im_end_id in mask.ids  # reasoning may not stop
    answer = reasoning + [end_think] + tokenizer.encode('{"a": [1')
    assert tokenizer.token_to_id("]") in allowed(state.next_mask(answer))
    assert tokenizer.token_to_id("}") not in allowed(state.next_mask(answer))
    done = answer + tokenizer.encode("]}")
    assert state.next_mask(done) == TokenMask((tokenizer.im_end_id,))
    assert state.next_mask(done + [tokenizer.im_end_id]) is None
    off = constraints.JsonObject(tokenizer, "content")()
    assert "<think>" not in texts(off.next_mask([])) and "{" in texts(off.next_mask([]))
