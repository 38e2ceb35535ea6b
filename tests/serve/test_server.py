"""The server end to end on the real engine: the `tiny` preset with random weights and the
tiny tokenizer, served on a free loopback port, driven by the `openai` client.

One engine serves the whole module (2 slots, prefill chunks of 16, context 128) so that the
jitted programs compile once. Outputs are random text: the tests check shapes, finish reasons,
usage, that streaming and non-streaming agree at temperature 0, and that the server keeps
serving through bad requests, concurrency and disconnects.
"""

import threading
import time

import httpx2
import pytest

import k2jax
from serve.generation import generate
from cli import main as k2jax_main
from serve import chat
from serve.server_cli import preset_for_tokenizer
from tests.serve.served import AUTH, ENGINE_OPTIONS, LIMITS, MODEL

SHORT_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
FINISH_REASONS = {"stop", "length", "tool_calls"}


def _message_fields(message) -> tuple:
    extra = message.model_extra or {}
    calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()]
    return extra.get("reasoning_content"), message.content, calls


def test_chat_stream_matches_response(client, tiny):
    tokenizer = tiny[2]
    response = client.chat.completions.create(model=MODEL, messages=SHORT_CHAT, max_tokens=12,
                                              temperature=0)
    (choice,) = response.choices
    assert response.object == "chat.completion" and response.model == MODEL
    assert choice.message.role == "assistant" and choice.finish_reason in FINISH_REASONS
    prompt_tokens = len(chat.render(tokenizer, SHORT_CHAT).token_ids)
    assert response.usage.prompt_tokens == prompt_tokens
    assert 1 <= response.usage.completion_tokens <= 12

    reasoning, content, calls, reasons = "", "", {}, []
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=SHORT_CHAT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    for chunk in chunks[:-1]:
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        for call in delta.tool_calls or ():
            entry = calls.setdefault(call.index, [call.id, call.function.name, ""])
            entry[2] += call.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert chunks[-1].usage == response.usage
    assert reasons[-1] == choice.finish_reason
    assert (reasoning or None, content or None, [tuple(c) for c in calls.values()]) == (
        _message_fields(choice.message))


def test_chat_with_tools_and_n(client):
    tools = [{"type": "function", "function": {"name": "f"}}]
    response = client.chat.completions.create(model=MODEL, messages=SHORT_CHAT, tools=tools,
                                              n=2, max_tokens=6, seed=3)
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:
        assert choice.finish_reason in FINISH_REASONS
        assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)
    assert response.usage.completion_tokens <= 12


def test_text_completions(client, served):
    response = client.completions.create(model=MODEL, prompt=["Hello", "Bye"], n=2,
                                         max_tokens=5, seed=1)
    assert response.object == "text_completion"
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert {c.finish_reason for c in response.choices} <= {"stop", "length"}
    assert response.usage.prompt_tokens == len("HelloBye")  # the test tokenizer: one per byte
    by_ids = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=5)
    assert by_ids.usage.prompt_tokens == 3
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=5,
                                            temperature=0, stream=True))
    once = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == once.choices[0].text
    assert chunks[-1].choices[0].finish_reason == once.choices[0].finish_reason
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_32_concurrent_clients_share_the_batch(client, served):
    engine = served.engine
    before = dict(engine.stats)
    results, errors = [], []

    def ask(i):
        try:
            results.append(client.chat.completions.create(
                model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": f"Q{i}"}],
                max_tokens=4, seed=i))
        except Exception as e:  # collected: a thread's exception would be lost
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 32
    assert all(r.choices[0].finish_reason in FINISH_REASONS for r in results)
    generated = engine.stats["generated_tokens"] - before["generated_tokens"]
    decode_steps = engine.stats["decode_steps"] - before["decode_steps"]
    assert generated == sum(r.usage.completion_tokens for r in results)
    assert decode_steps < generated  # steps decoded both slots at once


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served, client):
    url, auth = served.url, AUTH
    good = {"model": MODEL, "messages": SHORT_CHAT, "max_tokens": 3}
    with httpx2.Client(base_url=url, timeout=60) as http:
        cases = [
            (http.post("/v1/chat/completions", content=b'{"model": ', headers=auth), 400, None),
            (http.post("/v1/chat/completions", json={**good, "top_p": 0}, headers=auth), 400,
             "top_p"),
            (http.post("/v1/chat/completions", json={**good, "max_tokens": 500}, headers=auth),
             400, "max_tokens"),
            (http.post("/v1/chat/completions", json={**good, "functions": []}, headers=auth), 400,
             "functions"),
            (http.post("/v1/completions", json={"model": MODEL,
                                                  "prompt": "x" * (LIMITS.max_prompt_tokens + 1)},
                       headers=auth), 413, None),
            (http.post("/v1/completions", json={"model": MODEL, "prompt": [9999]},
                       headers=auth), 400, "prompt"),
            (http.post("/v1/chat/completions", json=good,
                       headers={"Authorization": "Bearer wrong"}), 401, None),
            (http.get("/v1/models"), 401, None),
        ]
        for response, status, param in cases:
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert error["message"] and error["param"] == param
        assert http.get("/health").json()["status"] == "ok"
    assert client.chat.completions.create(**good).choices[0].finish_reason in FINISH_REASONS


def test_client_disconnect_frees_the_slots(served, client, monkeypatch):
    engine, loop = served.engine, served.loop
    step, abort, aborted = engine.step, engine.abort, []
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.05), step())[1])
    monkeypatch.setattr(engine, "abort", lambda rid: (aborted.append(rid), abort(rid))[1])
    streams = [client.chat.completions.create(model=MODEL, messages=SHORT_CHAT, max_tokens=60,
                                              temperature=0, stream=True) for _ in range(2)]
    for stream in streams:  # both slots are busy: each has sent its first token
        next(stream)
        next(stream)
        stream.close()
    deadline = time.monotonic() + 20
    while loop.in_flight or engine.scheduler.running:
        assert time.monotonic() < deadline, "disconnected requests still hold the engine"
        time.sleep(0.02)
    assert len(aborted) == 2
    assert engine.allocator.num_free == engine.allocator.num_pages
    monkeypatch.undo()
    reply = client.chat.completions.create(model=MODEL, messages=SHORT_CHAT, max_tokens=3)
    assert reply.choices[0].finish_reason in FINISH_REASONS


def test_generate_takes_conversations_like_the_server(tiny, client):
    config, params, tokenizer = tiny
    (result,) = generate((config, params), [SHORT_CHAT], tokenizer=tokenizer,
                               max_tokens=12, temperature=0, **ENGINE_OPTIONS)
    assert isinstance(result, chat.ChatResult)
    response = client.chat.completions.create(model=MODEL, messages=SHORT_CHAT, max_tokens=12,
                                              temperature=0)
    choice = response.choices[0]
    served_calls = [dict(c.model_dump(), function=c.function.model_dump())
                    for c in choice.message.tool_calls or ()]
    assert (result.reasoning_content, result.content, result.tool_calls) == (
        choice.message.model_extra.get("reasoning_content"), choice.message.content,
        served_calls)
    assert result.outputs[0].finish_reason == choice.finish_reason
    assert len(result.token_ids) == response.usage.completion_tokens


def test_serve_cli_help_shows_a_tiny_example(capsys):
    with pytest.raises(SystemExit) as exit_:
        k2jax_main(["serve", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "--preset tiny" in help_text and "--api-key" in help_text
    assert "--max-prompt-tokens" in help_text and "heavy" in help_text


def test_preset_tokenizer_alignment(tiny):
    config, _, tokenizer = tiny
    small = preset_for_tokenizer(k2jax.ModelConfig.preset("small"), tokenizer)
    assert small.vocab_size == tokenizer.vocab_size
    assert small.hidden_size == k2jax.ModelConfig.preset("small").hidden_size
    assert (config.eos_token_id, config.bos_token_id) == (tokenizer.eos_id, tokenizer.bos_id)


def test_serve_cli_builds_the_server(monkeypatch, capsys):
    import uvicorn

    seen = {}
    original_run = uvicorn.Server.run

    def serve_once(server, sockets):  # runs the real server, asks it once, then stops it
        seen["address"] = sockets[0].getsockname()[:2]
        url = "http://%s:%d" % seen["address"]
        thread = threading.Thread(target=original_run, args=(server,),
                                  kwargs=dict(sockets=sockets))
        thread.start()
        try:
            for _ in range(200):
                if server.started:
                    break
                time.sleep(0.05)
            headers = {"Authorization": "Bearer k"}
            seen["models"] = httpx2.get(url + "/v1/models", headers=headers).json()
            seen["anonymous"] = httpx2.get(url + "/v1/models").status_code
        finally:
            server.should_exit = True
            thread.join(timeout=30)

    monkeypatch.setattr(uvicorn.Server, "run", serve_once)
    monkeypatch.setenv("K2JAX_API_KEY", "k")
    assert k2jax_main(["serve", "--preset", "tiny", "--port", "0", "--max-batch", "2"]) == 0
    assert seen["models"]["data"][0]["id"] == MODEL and seen["anonymous"] == 401
    assert seen["address"][0] == "127.0.0.1"
    assert "test tokenizer" in capsys.readouterr().err


def test_serve_cli_refuses_a_busy_port_before_loading(capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert k2jax_main(["serve", "--preset", "tiny", "--port", str(port)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("k2jax serve: error: cannot listen on 127.0.0.1:%d" % port)
    assert "\n" not in error


def test_serve_cli_errors_are_one_line(capsys):
    assert k2jax_main(["serve", "--checkpoint", "/nonexistent"]) == 2
    assert k2jax_main(["serve", "--preset", "tiny", "--tokenizer", "/nonexistent/x"]) == 2
    assert k2jax_main(["serve", "--preset", "tiny", "--port", "0", "--max-seq-len", "16777216"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    errors = [e for e in errors if not e.startswith("note:")]
    assert len(errors) == 3 and all(e.startswith("k2jax serve: error:") for e in errors), errors
    assert "max_seq_len=16777216 is beyond the model's context" in errors[2]
