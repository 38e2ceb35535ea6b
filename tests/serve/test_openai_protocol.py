"""The OpenAI wire format of the server, on a scripted engine: exact tool calls, reasoning and
finish reasons through the real `openai` client, request validation, API keys, disconnects
and engine failures. No model runs here (see test_server.py for the real engine)."""

import copy
import json
import threading
import time

import httpx2
import openai
import pytest

from k2jax.text.chat_formats import chat_format
from serve import openai_protocol as proto
from serve.engine_loop import EngineLoop
from serve.openai_protocol import ProtocolError
from serve.server import BackgroundServer, OpenAIServer, ServerLimits
from tests.serve.scripted_engine import ScriptedEngine, token_ids

API_KEY = "sk-test-key"
MODEL = "scripted"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOL_CALL_OUTPUT = (
    "<think>", "The user wants the weather, so I call the tool.", "</think>", "Let me check.",
    "<|tool_calls_section_begin|>", "<|tool_call_begin|>", "functions.get_weather:0",
    "<|tool_call_argument_begin|>", '{"city": "Paris"}', "<|tool_call_end|>",
    "<|tool_calls_section_end|>", "<|im_end|>")


def _script(tokenizer):
    """Outputs chosen by the last user message of the prompt."""
    outputs = {
        "weather?": TOOL_CALL_OUTPUT,
        "think long": ("<think>", "Hmm, " * 40, "</think>", "Done.", "<|im_end|>"),
        "forever": ("a" * 5000,),
        "hello": ("<think>", "Greet back.", "</think>", "Hello there!", "<|im_end|>"),
    }

    def script(prompt_ids, params, index):
        prompt = tokenizer.decode(prompt_ids)
        for key, parts in outputs.items():
            if key in prompt.rsplit("<|im_user|>", 1)[-1]:
                return token_ids(tokenizer, *parts)
        return token_ids(tokenizer, f"completion {index}", "[EOS]")

    return script


@pytest.fixture(scope="module")
def scripted(tokenizer):
    engine = ScriptedEngine(tokenizer, _script(tokenizer), step_delay=0.002)
    loop = EngineLoop(engine).start()
    limits = ServerLimits(max_seq_len=100_000, max_prompt_tokens=50_000, max_tokens=10_000)
    app = OpenAIServer(loop, tokenizer, model_name=MODEL, limits=limits, api_key=API_KEY).app()
    with BackgroundServer(app) as server:
        yield engine, loop, server
    loop.stop()


@pytest.fixture(scope="module")
def client(scripted):
    return openai.OpenAI(base_url=scripted[2].url + "/v1", api_key=API_KEY, max_retries=0)


def _user(text):
    return [{"role": "user", "content": text}]


# ---- request validation --------------------------------------------------------------------

@pytest.mark.parametrize("body, field", [
    (b'{"model": "m", "messages": [', None),
    (b'[1, 2]', None),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 101}}',
     "logit_bias"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "functions": []}',
     "functions"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 21}',
     "top_logprobs"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
     b'"response_format": {"type": "xml"}}', "response_format.type"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
     b'"chat_template_kwargs": {"enable_thinking": false}}', "chat_template_kwargs.enable_thinking"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}',
     "temperature"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}', "n"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}',
     "max_tokens"),
    (b'{"model": "m", "messages": []}', "messages"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "heavy": {"n": 1}}',
     "heavy.n"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"}',
     "tool_choice"),
])
def test_bad_chat_requests_name_the_field(body, field):
    with pytest.raises(ProtocolError) as error:
        proto.parse_request(body, proto.ChatCompletionRequest)
    assert error.value.status == 400 and error.value.param == field
    if field:
        assert field in error.value.message


def test_completion_prompt_union_error_says_what_is_accepted():
    with pytest.raises(ProtocolError) as error:
        proto.parse_request(b'{"model": "m", "prompt": {"a": 1}}', proto.CompletionRequest)
    assert error.value.param == "prompt" and "string" in error.value.message


def test_nulls_mean_defaults_and_params_map_to_sampling():
    req = proto.parse_request(json.dumps({
        "model": "m", "messages": _user("x"), "stop": "END", "temperature": None, "top_k": 5,
        "seed": 7, "stop_token_ids": [3]}).encode(), proto.ChatCompletionRequest)
    params = proto.sampling_params(req, 12, stop_token_ids=(9,))
    assert (params.max_new_tokens, params.temperature, params.top_k, params.seed) == (12, 1.0, 5, 7)
    assert params.stop == ("END",) and params.stop_token_ids == (3, 9)
    both = proto.parse_request(json.dumps({"model": "m", "messages": _user("x"), "max_tokens": 3,
                                           "max_completion_tokens": 4}).encode(),
                               proto.ChatCompletionRequest)
    with pytest.raises(ProtocolError, match="max_completion_tokens"):
        proto.requested_max_tokens(both)


# ---- responses through the openai client ---------------------------------------------------

def test_tool_call_response(client, tokenizer):
    response = client.chat.completions.create(model=MODEL, messages=_user("weather?"),
                                              tools=[WEATHER_TOOL])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    assert choice.message.model_extra["reasoning_content"] == (
        "The user wants the weather, so I call the tool.")
    (call,) = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("functions.get_weather:0", "function",
                                                        "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert response.usage.completion_tokens == len(token_ids(tokenizer, *TOOL_CALL_OUTPUT))
    assert response.usage.total_tokens == (response.usage.prompt_tokens
                                           + response.usage.completion_tokens)


def test_streamed_tool_call_adds_up_to_the_response(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=_user("weather?"), tools=[WEATHER_TOOL], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    reasoning, content, calls, reasons = "", "", {}, []
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        delta = choice.delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        for call in delta.tool_calls or ():
            entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = call.id or entry["id"]
            entry["name"] += (call.function.name or "") if call.function else ""
            entry["arguments"] += (call.function.arguments or "") if call.function else ""
        reasons.append(choice.finish_reason)
    assert reasoning == "The user wants the weather, so I call the tool."
    assert content == "Let me check."
    assert calls == {0: {"id": "functions.get_weather:0", "name": "get_weather",
                         "arguments": '{"city": "Paris"}'}}
    assert reasons[-1] == "tool_calls" and set(reasons[:-1]) == {None}


def test_reasoning_counts_against_max_tokens(client):
    response = client.chat.completions.create(model=MODEL, messages=_user("think long"),
                                              max_tokens=12)
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    assert choice.message.model_extra["reasoning_content"].startswith("Hmm,")
    assert response.usage.completion_tokens == 12


def test_plain_answer_and_n_choices(client):
    response = client.chat.completions.create(model=MODEL, messages=_user("hello"), n=3)
    assert [c.index for c in response.choices] == [0, 1, 2]
    for choice in response.choices:
        assert (choice.message.content, choice.finish_reason) == ("Hello there!", "stop")
        assert choice.message.tool_calls is None


def test_tool_history_is_rendered_with_k2_ids(client, scripted, tokenizer):
    engine = scripted[0]
    messages = _user("weather?") + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc123", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc123", "content": "22 C, sunny"},
        {"role": "user", "content": "hello"}]
    client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    prompt = tokenizer.decode(engine.prompts[-1])
    assert "call_abc123" not in prompt
    assert "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>" in prompt
    assert "## Return of functions.get_weather:0\n22 C, sunny" in prompt


def _reasoning_names(fields: dict) -> dict:
    return {name: fields[name] for name in ("reasoning", "reasoning_content") if name in fields}


def _streamed_reasoning(chunks) -> dict:
    """Each reasoning field's text, added up over the chunks' deltas."""
    totals = {}
    for chunk in chunks:
        for name, text in _reasoning_names(chunk.choices[0].delta.model_extra or {}).items():
            totals[name] = totals.get(name, "") + text
    return totals


def test_reasoning_goes_out_under_both_names_by_default(client):
    request = dict(model=MODEL, messages=_user("hello"))
    message = client.chat.completions.create(**request).choices[0].message
    assert _reasoning_names(message.model_extra) == {"reasoning": "Greet back.",
                                                     "reasoning_content": "Greet back."}
    chunks = [c for c in client.chat.completions.create(**request, stream=True) if c.choices]
    assert _streamed_reasoning(chunks) == {"reasoning": "Greet back.",
                                           "reasoning_content": "Greet back."}


@pytest.mark.parametrize("only", ["reasoning", "reasoning_content"])
def test_a_server_option_picks_one_reasoning_name(scripted, tokenizer, only):
    limits = ServerLimits(max_seq_len=1000, max_prompt_tokens=500, max_tokens=100)
    app = OpenAIServer(scripted[1], tokenizer, model_name=MODEL, limits=limits,
                       reasoning_fields=(only,)).app()
    with BackgroundServer(app) as server:
        one = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        request = dict(model=MODEL, messages=_user("hello"))
        message = one.chat.completions.create(**request).choices[0].message
        assert _reasoning_names(message.model_extra) == {only: "Greet back."}
        chunks = [c for c in one.chat.completions.create(**request, stream=True) if c.choices]
        assert _streamed_reasoning(chunks) == {only: "Greet back."}
    with pytest.raises(ValueError, match="reasoning_fields"):
        OpenAIServer(scripted[1], tokenizer, model_name=MODEL, limits=limits,
                     reasoning_fields=("thoughts",))


@pytest.mark.parametrize("fields, rendered", [
    ({"reasoning": "R new"}, "R new"),
    ({"reasoning_content": "R old"}, "R old"),
    ({"reasoning": "R new", "reasoning_content": "R old"}, "R new"),
    ({"reasoning": None, "reasoning_content": "R old"}, "R old"),
])
def test_history_reasoning_is_read_under_either_name(client, scripted, tokenizer, fields,
                                                     rendered):
    # Reasoning is kept in a tool-call chain: the assistant turn that called, then its result.
    messages = _user("weather?") + [
        {"role": "assistant", "content": None, **fields, "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "22 C"}]
    client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    prompt = tokenizer.decode(scripted[0].prompts[-1])
    assert f"<|im_assistant|>assistant<|im_middle|><think>{rendered}</think>" in prompt
    assert prompt.count("R ") == 1


def test_a_k25_checkpoint_template_renders_and_parses_its_way(scripted, tokenizer):
    k25_tokenizer = copy.copy(tokenizer)
    k25_tokenizer.chat_format = chat_format("k2.5")
    limits = ServerLimits(max_seq_len=100_000, max_prompt_tokens=50_000, max_tokens=1000)
    app = OpenAIServer(scripted[1], k25_tokenizer, model_name=MODEL, limits=limits).app()
    with BackgroundServer(app) as server:
        k25 = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        response = k25.chat.completions.create(model=MODEL, messages=_user("weather?"),
                                               tools=[WEATHER_TOOL])
        prompt = tokenizer.decode(scripted[0].prompts[-1])
        assert prompt.startswith("<|im_system|>tool_declare<|im_middle|># Tools\n")
        assert "You are Kimi" not in prompt
        assert prompt.endswith("<|im_assistant|>assistant<|im_middle|><think>")
        message = response.choices[0].message
        assert message.model_extra["reasoning"] == "The user wants the weather, so I call the tool."
        assert message.tool_calls[0].id == "functions.get_weather:0"
        k25.chat.completions.create(model=MODEL, messages=_user("hello"),
                                    extra_body={"chat_template_kwargs": {"thinking": False}})
        assert tokenizer.decode(scripted[0].prompts[-1]).endswith("<|im_middle|><think></think>")


def test_preserve_thinking_keeps_every_turns_reasoning(client, scripted, tokenizer):
    messages = _user("q1") + [{"role": "assistant", "content": "a1", "reasoning": "R early"}] + (
        _user("hello"))
    client.chat.completions.create(model=MODEL, messages=messages)
    assert "R early" not in tokenizer.decode(scripted[0].prompts[-1])
    client.chat.completions.create(model=MODEL, messages=messages, extra_body={
        "chat_template_kwargs": {"preserve_thinking": True}})
    assert "<think>R early</think>a1" in tokenizer.decode(scripted[0].prompts[-1])


def test_text_completions_and_models(client, scripted, tokenizer):
    response = client.completions.create(model=MODEL, prompt=["one", "two"], n=2, max_tokens=50)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.text for c in response.choices] == ["completion 0", "completion 1"] * 2
    assert {c.finish_reason for c in response.choices} == {"stop"}
    # Text is encoded as ordinary tokens: a control token's text stays text.
    client.completions.create(model=MODEL, prompt="<|im_end|>", max_tokens=5)
    assert scripted[0].prompts[-1] == tokenizer.encode("<|im_end|>")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=[5, 6, 7], max_tokens=50, stream=True))
    assert streamed == "completion 0"
    assert [m.id for m in client.models.list().data] == [MODEL]


# ---- errors, keys, disconnects -------------------------------------------------------------

def test_errors_over_http(scripted):
    url = scripted[2].url
    good = {"model": MODEL, "messages": _user("hello")}
    with httpx2.Client(base_url=url, timeout=30) as http:
        auth = {"Authorization": f"Bearer {API_KEY}"}
        assert http.post("/v1/chat/completions", json=good).status_code == 401
        wrong = http.post("/v1/chat/completions", json=good,
                          headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        bad_json = http.post("/v1/chat/completions", content=b"{nope", headers=auth)
        assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
        unknown = http.post("/v1/chat/completions", json={**good, "model": "gpt-5"}, headers=auth)
        assert unknown.status_code == 404
        bad_message = http.post("/v1/chat/completions", headers=auth, json={
            **good, "messages": [{"role": "wizard", "content": "x"}]})
        assert bad_message.status_code == 400 and "messages[0].role" in bad_message.text
        assert http.get("/health").json()["status"] == "ok"
        assert http.post("/v1/chat/completions", json=good, headers=auth).status_code == 200


def _wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_disconnect_mid_stream_aborts_the_request(scripted, client):
    engine, loop, _ = scripted
    aborted = len(engine.aborted)
    stream = client.chat.completions.create(model=MODEL, messages=_user("forever"),
                                            max_tokens=5000, stream=True)
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    _wait_for(lambda: len(engine.aborted) == aborted + 1)
    _wait_for(lambda: loop.in_flight == 0)


def test_disconnect_while_waiting_aborts_the_request(scripted):
    engine, loop, server = scripted
    aborted = len(engine.aborted)
    body = {"model": MODEL, "prompt": "forever", "max_tokens": 5000}
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(server.url + "/v1/completions", json=body, timeout=0.3,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    _wait_for(lambda: len(engine.aborted) == aborted + 1)
    _wait_for(lambda: loop.in_flight == 0)


def test_engine_failure_is_reported_and_health_turns_503(tokenizer):
    engine = ScriptedEngine(tokenizer, lambda *_: token_ids(tokenizer, "x" * 50))
    engine.fail_with = RuntimeError("device lost")
    loop = EngineLoop(engine).start()
    limits = ServerLimits(max_seq_len=1000, max_prompt_tokens=500, max_tokens=100)
    app = OpenAIServer(loop, tokenizer, model_name=MODEL, limits=limits).app()
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=MODEL, messages=_user("hello"))
        health = httpx2.get(server.url + "/health")
        assert health.status_code == 503
        with pytest.raises(openai.InternalServerError):  # later requests fail fast
            client.chat.completions.create(model=MODEL, messages=_user("hello"))
    loop.stop()


def test_engine_loop_serves_many_threads_at_once(scripted, client):
    results, errors = [], []

    def ask(i):
        try:
            r = client.chat.completions.create(model=MODEL, messages=_user("hello"), seed=i)
            results.append(r.choices[0].message.content)
        except Exception as e:  # collected: a thread's exception would be lost
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == ["Hello there!"] * 16
