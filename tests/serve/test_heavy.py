"""Heavy mode: the aggregation prompt, and the two passes through the server on a scripted
engine (which records every prompt it is given)."""

import json

import openai
import pytest

from serve import chat
from serve.engine_loop import EngineLoop
from serve.heavy import AGGREGATION_INSTRUCTIONS, aggregation_messages, candidate_text
from serve.server import BackgroundServer, OpenAIServer, ServerLimits
from tests.serve.scripted_engine import ScriptedEngine, token_ids

MODEL = "scripted"
QUESTION = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 6 x 7?"}]


def test_aggregation_turn_quotes_every_candidate():
    candidates = [{"content": "42"}, {"content": None, "tool_calls": [
        {"id": "functions.calc:0", "type": "function",
         "function": {"name": "calc", "arguments": '{"expr": "6*7"}'}}]}, {"content": None}]
    messages = aggregation_messages(QUESTION, candidates)
    assert messages[:2] == QUESTION and messages[2]["role"] == "user"
    turn = messages[2]["content"]
    assert turn.startswith("## Candidate 1\n42\n\n## Candidate 2\nTool call: calc("
                           '{"expr": "6*7"})\n\n## Candidate 3\n(empty reply)\n\n')
    assert turn.endswith(AGGREGATION_INSTRUCTIONS.format(n=3))
    assert candidate_text("text", []) == "text"


def _script(tokenizer):
    def script(prompt_ids, params, index):
        last_turn = tokenizer.decode(prompt_ids).rsplit("<|im_user|>", 1)[-1]
        if "## Candidate" in last_turn:
            return token_ids(tokenizer, "<think>", "All agree.", "</think>", "42", "<|im_end|>")
        return token_ids(tokenizer, "<think>", "6 x 7", "</think>", f"4{index}", "<|im_end|>")

    return script


@pytest.fixture(scope="module")
def heavy_server(tokenizer):
    engine = ScriptedEngine(tokenizer, _script(tokenizer))
    loop = EngineLoop(engine).start()
    limits = ServerLimits(max_seq_len=2000, max_prompt_tokens=1000, max_tokens=100)
    app = OpenAIServer(loop, tokenizer, model_name=MODEL, limits=limits).app()
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        yield engine, client
    loop.stop()


def test_heavy_generates_candidates_then_aggregates(heavy_server, tokenizer):
    engine, client = heavy_server
    before = len(engine.prompts)
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20,
                                              extra_body={"heavy": {"n": 3}})
    first, second = engine.prompts[before:]
    assert first == chat.render(tokenizer, QUESTION).token_ids
    candidates = [{"role": "assistant", "content": f"4{i}", "reasoning": "6 x 7",
                   "reasoning_content": "6 x 7"} for i in range(3)]
    assert response.model_extra["heavy"] == {"candidates": candidates}
    expected = chat.render(tokenizer, aggregation_messages(QUESTION, candidates))
    assert second == expected.token_ids
    choice = response.choices[0]
    assert (choice.message.content, choice.finish_reason) == ("42", "stop")
    assert choice.message.model_extra["reasoning_content"] == "All agree."
    candidate_tokens = 3 * len(token_ids(tokenizer, "<think>", "6 x 7", "</think>", "40",
                                         "<|im_end|>"))
    answer_tokens = len(token_ids(tokenizer, "<think>", "All agree.", "</think>", "42",
                                  "<|im_end|>"))
    assert response.usage.prompt_tokens == len(first) + len(second)
    assert response.usage.completion_tokens == candidate_tokens + answer_tokens


def test_heavy_streams_the_final_answer(heavy_server):
    _, client = heavy_server
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=20, stream=True,
        stream_options={"include_usage": True}, extra_body={"heavy": {"n": 2}}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "42"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0


def test_heavy_needs_room_for_every_pass(heavy_server):
    _, client = heavy_server
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=100,
                                       extra_body={"heavy": {"n": 16}})
    body = error.value.body
    assert body["param"] == "max_tokens" and "17 passes" in body["message"]


def test_heavy_options_are_validated(heavy_server):
    _, client = heavy_server
    for heavy in ({"n": 1}, {"n": 2, "mode": "vote"}, 4):
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=MODEL, messages=QUESTION,
                                           extra_body={"heavy": heavy})
        assert error.value.body["param"].startswith("heavy"), json.dumps(error.value.body)


def test_generate_heavy_aggregates_the_candidates(tokenizer, monkeypatch):
    from serve import generation

    engines = []

    def scripted_engine(*args, **kwargs):
        engines.append(ScriptedEngine(tokenizer, _script(tokenizer)))
        return engines[-1]

    monkeypatch.setattr(generation, "make_engine", scripted_engine)
    (result,) = generation.generate(("config", "params"), QUESTION, tokenizer=tokenizer,
                                    heavy=3, max_tokens=20)
    assert [c.content for c in result.candidates] == ["40", "41", "42"]
    assert (result.reasoning_content, result.content, result.tool_calls) == ("All agree.", "42", [])
    assert result.outputs[0].finish_reason == "stop"
    candidates = [c.message() for c in result.candidates]
    assert engines[1].prompts == [
        chat.render(tokenizer, aggregation_messages(QUESTION, candidates)).token_ids]
    with pytest.raises(ValueError, match="heavy"):
        generation.generate(("config", "params"), QUESTION, tokenizer=tokenizer, heavy=1)
