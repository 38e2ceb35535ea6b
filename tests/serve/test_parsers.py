"""Output parsers: the defensive cases from K2_FORMAT.md, streaming == one-shot under any split
with no marker fragment ever emitted, and parse(render(message)) round trips."""

import random

import pytest

from k2jax.text import special_tokens as st
from k2jax.text.chat_template import apply_chat_template, render_chat
from k2jax.text.tool_call_ids import tool_name_from_id
from serve.parsers import OutputParser, ParsedMessage, parse_output, prompt_opens_reasoning


def _call(call_id, arguments):
    return {"id": call_id, "type": "function",
            "function": {"name": tool_name_from_id(call_id), "arguments": arguments}}


SECTION = "<|tool_calls_section_begin|>"
END_SECTION = "<|tool_calls_section_end|>"


def _tool(call_id, arguments):
    return f"<|tool_call_begin|>{call_id}<|tool_call_argument_begin|>{arguments}<|tool_call_end|>"


# Only the end of a call ends arguments; any other marker text inside them is data.
MARKERS_AS_ARGUMENTS = '{"text": "<think>x</think> <|im_user|> <|tool_call_argument_begin|> <|tool_call"}'

# (name, generated text, starts_in_reasoning, expected (reasoning, content, tool_calls))
CASES = [
    ("reasoning_then_answer", "<think>Let me think.\nStep 1.</think>The answer is 42.<|im_end|>", False,
     ("Let me think.\nStep 1.", "The answer is 42.", [])),
    ("no_reasoning", "Hello there, 世界 😀", False, (None, "Hello there, 世界 😀", [])),
    ("whitespace_around_think", "\n <think>\nr\n</think>\n\nc\n", False, ("r", "c", [])),
    ("reasoning_straight_into_tools",
     '<think>Need data.' + SECTION + _tool("functions.search:0", '{"q": "k2"}') + END_SECTION, False,
     ("Need data.", None, [_call("functions.search:0", '{"q": "k2"}')])),
    ("prefilled_think", "plan</think>done", True, ("plan", "done", [])),
    ("prefilled_think_written_again", "<think>plan</think>done", True, ("plan", "done", [])),
    ("singular_section_spelling",
     "<think>r</think>ok<|tool_call_section_begin|>" + _tool("functions.f:0", "{}")
     + "<|tool_call_section_end|><|im_end|>", False, ("r", "ok", [_call("functions.f:0", "{}")])),
    ("newlines_everywhere",
     "<think>r</think>\n" + SECTION + "\n<|tool_call_begin|>\n functions.write_file:0 \n"
     '<|tool_call_argument_begin|>\n{\n  "path": "a.py",\n  "text": "l1\\nl2"\n}\n<|tool_call_end|>\n'
     + END_SECTION + "\n", False,
     ("r", None, [_call("functions.write_file:0", '{\n  "path": "a.py",\n  "text": "l1\\nl2"\n}')])),
    ("ids_with_dash_and_dot_back_to_back",
     SECTION + _tool("functions.get-weather:0", '{"a":1}') + _tool("functions.search.v2:1", '{"b":2}')
     + _tool("functions.x_y:2", "{}") + END_SECTION, False,
     (None, None, [_call("functions.get-weather:0", '{"a":1}'), _call("functions.search.v2:1", '{"b":2}'),
                   _call("functions.x_y:2", "{}")])),
    ("missing_call_and_section_ends",
     "<think>r</think>" + SECTION + '<|tool_call_begin|>functions.a:0<|tool_call_argument_begin|>{"x":1}'
     '<|tool_call_begin|>functions.b:1<|tool_call_argument_begin|>{"y":2}<|im_end|>', False,
     ("r", None, [_call("functions.a:0", '{"x":1}'), _call("functions.b:1", '{"y":2}')])),
    ("cut_off_inside_arguments",
     "<think>r</think>Sure." + SECTION + _tool("functions.read:0", "{}")
     + '<|tool_call_begin|>functions.write:1<|tool_call_argument_begin|>{"text": "partial', False,
     ("r", "Sure.", [_call("functions.read:0", "{}"), _call("functions.write:1", '{"text": "partial')])),
    ("cut_off_inside_id", "<think>r</think>Sure." + SECTION + "<|tool_call_begin|>functions.wri", False,
     ("r", "Sure.", [])),
    ("cut_off_in_reasoning", "<think>Long reasoning that never", False,
     ("Long reasoning that never", None, [])),
    ("misplaced_markers_are_dropped",
     "<think>r<think></think>a</think> b<think> c<|tool_call_end|>d<|im_end|>ignored after the end", False,
     ("r", "a b cd", [])),
    ("arguments_may_mention_markers",
     SECTION + _tool("functions.note:0", MARKERS_AS_ARGUMENTS) + END_SECTION, False,
     (None, None, [_call("functions.note:0", MARKERS_AS_ARGUMENTS)])),
    # As vLLM (both modes) and SGLang (one-shot) parse it: what follows the section is dropped.
    ("text_after_the_section_is_not_content",
     "<think>r</think>Before." + SECTION + " \n " + _tool("functions.f:0", "{}") + "\n" + END_SECTION
     + "trailing text<|im_end|>", False, ("r", "Before.", [_call("functions.f:0", "{}")])),
    ("text_between_calls_and_a_second_section",
     SECTION + _tool("functions.f:0", "{}") + "between" + END_SECTION + "after"
     + SECTION + _tool("functions.g:1", '{"a": 1}') + END_SECTION, False,
     (None, None, [_call("functions.f:0", "{}"), _call("functions.g:1", '{"a": 1}')])),
    ("ids_that_name_no_function_are_dropped",
     SECTION + _tool("call_abc123", '{"a":1}') + _tool("functions.lookup", '{"b":2}')
     + _tool("functions.get weather:2", "{}") + _tool("7", "{}") + _tool("functions.ok:4", '{"c":3}')
     + END_SECTION, False, (None, None, [_call("functions.ok:4", '{"c":3}')])),
    ("id_without_the_functions_prefix", SECTION + _tool("search:0", '{"q": 1}') + END_SECTION, False,
     (None, None, [_call("search:0", '{"q": 1}')])),
    ("calls_without_arguments_get_an_empty_object",
     SECTION + _tool("functions.now:0", " ") + "<|tool_call_begin|>functions.today:1<|tool_call_end|>"
     + END_SECTION, False, (None, None, [_call("functions.now:0", "{}"), _call("functions.today:1", "{}")])),
    ("call_without_section_begin", "<think>r</think>text" + _tool("functions.f:0", "{}"), False,
     ("r", "text", [_call("functions.f:0", "{}")])),
    ("call_without_id_is_dropped", SECTION + _tool(" ", '{"a":1}') + END_SECTION, False, (None, None, [])),
    ("angle_brackets_that_are_not_markers", "<think>if a < b and b <| c</think>x <y> <|im_e", False,
     ("if a < b and b <| c", "x <y> <|im_e", [])),
    ("only_whitespace", "  \n ", False, (None, None, [])),
]
CASE_IDS = [case[0] for case in CASES]


def _expected(case) -> ParsedMessage:
    reasoning, content, tool_calls = case[3]
    return ParsedMessage(reasoning, content, tool_calls)


def _replay(deltas) -> ParsedMessage:
    """Rebuilds a message from stream deltas the way an OpenAI client accumulates them."""
    calls = []
    for delta in deltas:
        for call_delta in delta.tool_calls:
            if "id" in call_delta:
                assert call_delta["index"] == len(calls) and call_delta["type"] == "function"
                calls.append({"id": call_delta["id"], "type": "function",
                              "function": dict(call_delta["function"])})
            else:
                calls[call_delta["index"]]["function"]["arguments"] += call_delta["function"]["arguments"]
    return ParsedMessage("".join(d.reasoning_content for d in deltas) or None,
                         "".join(d.content for d in deltas) or None, calls)


def _assert_prefix_of(partial: ParsedMessage, final: ParsedMessage) -> None:
    """What was streamed so far never has to be taken back: no marker fragment slipped out."""
    assert (final.reasoning_content or "").startswith(partial.reasoning_content or "")
    assert (final.content or "").startswith(partial.content or "")
    assert len(partial.tool_calls) <= len(final.tool_calls)
    for streamed, complete in zip(partial.tool_calls, final.tool_calls):
        assert streamed["id"] == complete["id"]
        assert streamed["function"]["name"] == complete["function"]["name"]
        assert complete["function"]["arguments"].startswith(streamed["function"]["arguments"])


def _stream(pieces, starts_in_reasoning, expected: ParsedMessage) -> None:
    parser = OutputParser(starts_in_reasoning=starts_in_reasoning)
    deltas = []
    for piece in pieces:
        deltas.append(parser.feed(piece))
        _assert_prefix_of(_replay(deltas), expected)
    deltas.append(parser.finish())
    assert _replay(deltas) == expected
    assert parser.result() == expected


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_one_shot(case):
    _, text, starts_in_reasoning, _ = case
    assert parse_output(text, starts_in_reasoning=starts_in_reasoning) == _expected(case)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_streaming_any_split_matches_one_shot(case):
    _, text, starts_in_reasoning, _ = case
    expected = _expected(case)
    _stream([text], starts_in_reasoning, expected)
    _stream(list(text), starts_in_reasoning, expected)
    for split in range(len(text) + 1):
        _stream([text[:split], text[split:]], starts_in_reasoning, expected)
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 12))))
        _stream([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])], starts_in_reasoning, expected)


def test_several_markers_in_one_delta():
    parser = OutputParser()
    first = parser.feed("<think>plan</think>Checking." + SECTION + "<|tool_call_begin|>functions.f:0"
                        "<|tool_call_argument_begin|>{\"a\"")
    assert first.to_openai() == {
        "reasoning": "plan", "reasoning_content": "plan", "content": "Checking.",
        "tool_calls": [{"index": 0, "id": "functions.f:0", "type": "function",
                        "function": {"name": "f", "arguments": '{"a"'}}]}
    second = parser.feed(": 1}<|tool_call_end|>" + _tool("functions.g:1", "{}") + END_SECTION + "<|im_end|>")
    assert second.tool_calls == [{"index": 0, "function": {"arguments": ": 1}"}},
                                 {"index": 1, "id": "functions.g:1", "type": "function",
                                  "function": {"name": "g", "arguments": "{}"}}]
    assert not parser.finish()


def test_marker_prefix_is_held_back_until_resolved():
    parser = OutputParser()
    assert parser.feed("<think>x</think>Answer <|tool_calls_sec").content == "Answer"
    assert not parser.feed("tion_begin|>")
    delta = parser.feed("<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}")
    assert delta.tool_calls[0]["id"] == "functions.f:0"


def test_large_arguments_stream_in_linear_time():
    file_text = "".join(f"line {i}: {'x' * 40} <tag> \\n" for i in range(2500))  # ~130 kB
    text = SECTION + _tool("functions.write_file:0", '{"text": "' + file_text + '"}') + END_SECTION
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    parser = OutputParser()
    for piece in pieces:
        parser.feed(piece)
    parser.finish()
    assert parser.result().tool_calls[0]["function"]["arguments"] == '{"text": "' + file_text + '"}'


def test_feed_after_finish_raises():
    parser = OutputParser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


@pytest.mark.parametrize("call_id, name", [
    ("functions.get_weather:0", "get_weather"), ("functions.search.v2:12", "search.v2"),
    ("functions.get-weather:3", "get-weather"), ("get_weather:0", "get_weather"),
    ("functions.lookup", None), ("plain", None), ("call_abc", None), ("3", None),
    ("functions.a:1:2", None), ("functions.get weather:0", None), ("functions.:0", None)])
def test_tool_name_from_id(call_id, name):
    assert tool_name_from_id(call_id) == name


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<|im_assistant|>assistant<|im_middle|><think>")
    assert not prompt_opens_reasoning("<|im_assistant|>assistant<|im_middle|><think></think>")
    assert not prompt_opens_reasoning(render_chat([{"role": "user", "content": "hi"}]))


OLD_NAME = ("reasoning_content",)  # the messages below carry reasoning under this name only


def test_reasoning_goes_out_under_the_names_asked_for():
    parsed = parse_output("<think>why</think>so")
    assert parsed.to_openai() == {"role": "assistant", "content": "so", "reasoning": "why",
                                  "reasoning_content": "why"}
    assert parsed.to_openai(("reasoning",)) == {"role": "assistant", "content": "so",
                                                "reasoning": "why"}
    assert parse_output("so").to_openai() == {"role": "assistant", "content": "so"}


ASSISTANT_MESSAGES = [
    {"role": "assistant", "content": "Plain answer, 中文 and 😀.",
     "reasoning_content": "Short thought.\nTwo lines."},
    {"role": "assistant", "content": None, "reasoning_content": "Call two tools.",
     "tool_calls": [_call("functions.get_weather:0", '{"city": "北京"}'),
                    _call("functions.search.v2:1", '{"q": "multi\\nline", "n": [1, 2]}')]},
    {"role": "assistant", "content": "Let me look.", "reasoning_content": "One call.",
     "tool_calls": [_call("functions.read-file:7", '{\n  "path": "<think>.txt"\n}')]},
    {"role": "assistant", "content": "No reasoning here."},
]


def _rendered_assistant_turn(message) -> str:
    conversation = [{"role": "user", "content": "question"}, message]
    if message.get("tool_calls"):  # keeps the reasoning: the message is in the current tool chain
        conversation.append({"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "r"})
    text = render_chat(conversation, add_generation_prompt=False)
    return text.split("<|im_assistant|>assistant<|im_middle|>")[1].split("<|im_system|>")[0]


@pytest.mark.parametrize("message", ASSISTANT_MESSAGES, ids=range(len(ASSISTANT_MESSAGES)))
def test_parse_of_render_round_trips(message):
    if not message.get("tool_calls"):  # a final answer's reasoning is not rendered; keep it via a tool chain
        message = {**message, "reasoning_content": None}
    assert parse_output(_rendered_assistant_turn(message)).to_openai(OLD_NAME) == {
        key: value for key, value in message.items() if value is not None or key == "content"}


@pytest.mark.parametrize("message", ASSISTANT_MESSAGES[1:3], ids=[1, 2])
def test_round_trip_through_token_ids_and_streaming_detokenization(tokenizer, message):
    conversation = [{"role": "user", "content": "question"}, message,
                    {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "r"}]
    ids = apply_chat_template(tokenizer, conversation, add_generation_prompt=False).token_ids
    header = ids.index(tokenizer.special_id(st.IM_ASSISTANT))
    body_start = ids.index(tokenizer.special_id(st.IM_MIDDLE), header) + 1
    turn = ids[body_start:ids.index(tokenizer.im_end_id, header) + 1]  # body and its <|im_end|>
    assert parse_output(tokenizer.decode(turn, skip_special_tokens=True)).to_openai(
        OLD_NAME) == message

    detokenizer, parser, deltas = tokenizer.detokenizer(skip_special_tokens=True), OutputParser(), []
    for token_id in turn:
        text = detokenizer.add(token_id)
        assert "\ufffd" not in text
        deltas.append(parser.feed(text))
    deltas += [parser.feed(detokenizer.finish()), parser.finish()]
    assert _replay(deltas).to_openai(OLD_NAME) == message
