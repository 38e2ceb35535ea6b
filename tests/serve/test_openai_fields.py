"""The OpenAI fields beyond sampling, end to end on the real engine through the `openai`
client: logprobs, logit_bias, stream usage, ignored fields, chat_template_kwargs, tool_choice
and parallel_tool_calls, response_format. The model is random (the `tiny` preset), so the tests
steer it with logit_bias where they need a particular output; the engine and server
are tests/serve/conftest.py's. The test tokenizer spends a token per
byte, so tool declarations are as short as the template allows."""

import json
import logging

import httpx2

from serve import chat
from tests.serve.served import AUTH, MODEL

CHAT = [{"role": "system", "content": "."}, {"role": "user", "content": "Hi"}]
TOOLS = [{"function": {"name": name}} for name in "ab"]  # 100 prompt tokens with CHAT
NO_THINKING = {"chat_template_kwargs": {"thinking": False}}


def _special(served, name):
    return served.tokenizer.special_id(name)


def _post(served, path, body):
    return httpx2.post(served.url + path, json={"model": MODEL, **body}, headers=AUTH,
                       timeout=60)


# ---- logprobs ---------------------------------------------------------------------------------

def _entries(logprobs):
    return [(e.token, e.logprob, tuple(e.bytes), [(t.token, t.logprob) for t in e.top_logprobs])
            for e in logprobs.content]


def test_chat_logprobs_streamed_and_not(client):
    request = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                   top_logprobs=3)
    response = client.chat.completions.create(**request)
    entries = _entries(response.choices[0].logprobs)
    assert len(entries) == response.usage.completion_tokens
    for token, logprob, raw, top in entries:
        assert len(top) == 3 and top[0] == (token, logprob)  # greedy: the top token
        assert logprob <= 0 and raw
    streamed = []
    for chunk in client.chat.completions.create(**request, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += _entries(chunk.choices[0].logprobs)
    assert streamed == entries
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    assert plain.choices[0].logprobs is None
    no_top = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3,
                                            logprobs=True)
    assert all(e.top_logprobs == [] for e in no_top.choices[0].logprobs.content)


def test_completion_logprobs_streamed_and_not(client):
    request = dict(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, logprobs=2)
    response = client.completions.create(**request)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == response.usage.completion_tokens
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i]))
                                    for i in range(len(logprobs.tokens))]
    tokens, offsets = [], []
    for chunk in client.completions.create(**request, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert (tokens, offsets) == (logprobs.tokens, logprobs.text_offset)


# ---- logit_bias -------------------------------------------------------------------------------

def test_logit_bias_bans_and_forces_tokens(client, served):
    def greedy(**extra):
        response = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=4,
                                             temperature=0, logprobs=0, **extra)
        return response.choices[0].logprobs.tokens

    first = greedy()[0]
    first_id = served.tokenizer.token_to_id(first)
    assert greedy(logit_bias={str(first_id): -100})[0] != first
    forced = served.tokenizer.token_to_id("e")
    assert greedy(logit_bias={str(forced): 100}) == ["e"] * 4
    too_big = _post(served, "/v1/completions", {"prompt": "x", "logit_bias": {"512": 1}})
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "logit_bias"
    not_an_id = _post(served, "/v1/chat/completions", {"messages": CHAT,
                                                       "logit_bias": {"a": 1}})
    assert not_an_id.status_code == 400 and not_an_id.json()["error"]["param"] == "logit_bias"


# ---- stream usage, ignored and unknown fields ---------------------------------------------------

def test_include_usage_is_the_last_chunk(client):
    for create, body in ((client.chat.completions.create, dict(messages=CHAT)),
                         (client.completions.create, dict(prompt="Hello"))):
        chunks = list(create(model=MODEL, max_tokens=4, stream=True,
                             stream_options={"include_usage": True}, **body))
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
        assert all(c.usage is None for c in chunks[:-1])
        without = list(create(model=MODEL, max_tokens=4, stream=True, **body))
        assert all(c.usage is None and c.choices for c in without)


def test_ignored_fields_warn_once_and_unknown_ones_are_400s(client, served, caplog):
    with caplog.at_level(logging.WARNING, logger="serve.server"):
        response = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=2, user="u1", reasoning_effort="low",
            metadata={"k": "v"}, store=False, service_tier="auto",
            extra_body={"verbosity": "low", "modalities": ["text"]})
    assert response.choices[0].finish_reason in {"stop", "length"}
    warnings = [r.getMessage() for r in caplog.records if r.name == "serve.server"]
    assert len(warnings) == 1
    for name in ("user", "reasoning_effort", "metadata", "store", "service_tier", "verbosity",
                 "modalities"):
        assert name in warnings[0]
    unknown = _post(served, "/v1/chat/completions", {"messages": CHAT, "frobnicate": 1})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "frobnicate"


# ---- chat_template_kwargs, response_format -----------------------------------------------------

def test_thinking_off_prefills_an_empty_think_block(client, served):
    tokenizer = served.tokenizer
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6,
                                              extra_body=NO_THINKING)
    expected = chat.render(tokenizer, CHAT, thinking=False)
    assert expected.text.endswith("<|im_middle|><think></think>")
    assert response.usage.prompt_tokens == len(expected.token_ids)
    assert (response.choices[0].message.model_extra or {}).get("reasoning_content") is None
    unknown = _post(served, "/v1/chat/completions",
                    {"messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "chat_template_kwargs.enable_thinking"


def test_response_format(client, served):
    text = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                          response_format={"type": "text"})
    assert text.choices[0].finish_reason in {"stop", "length"}
    tokenizer = served.tokenizer
    request = dict(model=MODEL, messages=CHAT, max_tokens=20, extra_body=NO_THINKING,
                   response_format={"type": "json_object"})
    closing = {str(tokenizer.token_to_id("}")): 100}
    answer = client.chat.completions.create(**request, logit_bias=closing).choices[0]
    assert (answer.message.content, answer.finish_reason) == ("{}", "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **request, logit_bias=closing, stream=True) if c.choices)
    assert streamed == "{}"
    free = client.chat.completions.create(**request, seed=1).choices[0]
    if free.finish_reason == "stop":
        assert isinstance(json.loads(free.message.content), dict)
    else:
        assert free.message.content.startswith("{")
    refused = _post(served, "/v1/chat/completions", {
        "messages": CHAT, "tools": TOOLS, "tool_choice": "required",
        "response_format": {"type": "json_object"}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format"


# ---- tool_choice, parallel_tool_calls -----------------------------------------------------------

def _ending_calls(served, **more):
    """logit_bias that makes the model end calls' arguments at once (and other tokens)."""
    return {str(_special(served, "<|tool_call_end|>")): 100,
            **{str(_special(served, name)): 100 for name in more.get("also", ())}}


def test_named_tool_choice_forces_that_call(client, served):
    request = dict(model=MODEL, messages=CHAT, tools=TOOLS, max_tokens=28,
                   tool_choice={"type": "function", "function": {"name": "b"}},
                   logit_bias=_ending_calls(served), extra_body=NO_THINKING)
    response = client.chat.completions.create(**request)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    # The bias ends the arguments at once: an argument-less call reads `{}`, as vLLM gives it.
    assert (call.id, call.function.name, call.function.arguments) == (
        "functions.b:0", "b", "{}")
    calls = {}
    for chunk in client.chat.completions.create(**request, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            calls.setdefault(delta.index, delta.function.name)
    assert calls == {0: "b"}
    missing = _post(served, "/v1/chat/completions", {
        "messages": CHAT, "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "tool_choice"
    no_tools = _post(served, "/v1/chat/completions", {"messages": CHAT,
                                                      "tool_choice": "required"})
    assert no_tools.status_code == 400 and no_tools.json()["error"]["param"] == "tool_choice"


def test_required_tool_choice_and_parallel_tool_calls(client, served):
    bias = _ending_calls(served, also=("<|tool_call_begin|>",))
    request = dict(model=MODEL, messages=CHAT, tool_choice="required", logit_bias=bias,
                   extra_body=NO_THINKING)
    one = client.chat.completions.create(**request, tools=TOOLS, max_tokens=28,
                                         parallel_tool_calls=False)
    assert one.choices[0].finish_reason == "tool_calls"
    (call,) = one.choices[0].message.tool_calls
    assert call.function.name in {"a", "b"} and call.id.endswith(":0")
    # Parallel calls (the default): the bias makes the model call again and again.
    many = client.chat.completions.create(**request, tools=TOOLS[:1], max_tokens=50).choices[0]
    assert len(many.message.tool_calls) > 1 and many.finish_reason == "length"
    assert [c.id for c in many.message.tool_calls] == [
        f"functions.a:{i}" for i in range(len(many.message.tool_calls))]


def test_tool_choice_none_never_calls(client, served):
    bias = {str(_special(served, "<|tool_calls_section_begin|>")): 100,
            str(_special(served, "<|tool_call_begin|>")): 100}
    response = client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS,
                                              tool_choice="none", max_tokens=8, logit_bias=bias,
                                              extra_body=NO_THINKING)
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason in {"stop", "length"}
    assert json.dumps(response.model_dump())  # a plain answer, serialisable
