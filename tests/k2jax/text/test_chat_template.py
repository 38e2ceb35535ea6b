"""K2 Thinking's chat template: renders checked against strings written out from K2_FORMAT.md,
token ids with control tokens only from the template, validation errors."""

import pytest

from k2jax.text import special_tokens as st
from k2jax.text.chat_template import DEFAULT_SYSTEM_PROMPT, apply_chat_template, render_chat

DEFAULT_SYSTEM = ("<|im_system|>system<|im_middle|>"
                  "You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>")
GENERATION_PROMPT = "<|im_assistant|>assistant<|im_middle|>"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "天气 lookup",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# A tool-call chain after an earlier finished exchange: the first answer loses its reasoning,
# everything after it (the current chain) keeps it.
CHAIN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "reasoning_content": "Greet back.", "content": "Hello! How can I help?"},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Beijing "},
                                 {"type": "text", "text": "and Paris?"}]},
    {"role": "assistant", "reasoning_content": "Two cities, two calls.", "content": "Checking both.",
     "tool_calls": [_call("functions.get_weather:0", "get_weather", '{"city": "Beijing"}'),
                    _call("functions.get_weather:1", "get_weather", '{"city":"Paris"}')]},
    {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "23°C, sunny"},
    {"role": "tool", "name": "get_weather", "tool_call_id": "functions.get_weather:1", "content": "18°C"},
    {"role": "assistant", "reasoning_content": "Also need Fahrenheit.", "content": None,
     "tool_calls": [_call("functions.convert-units.v2:2", "convert-units.v2", {"value": 23, "to": "°F"})]},
    {"role": "tool", "tool_call_id": "functions.convert-units.v2:2", "content": "73.4"},
]

CHAIN_TEXT = (
    # Keys sorted recursively, as the official tokenizer does before the template's tojson.
    '<|im_system|>tool_declare<|im_middle|>[{"function":{"description":"天气 lookup",'
    '"name":"get_weather","parameters":{"properties":{"city":{"type":"string"}},'
    '"required":["city"],"type":"object"}},"type":"function"}]<|im_end|>'
    "<|im_system|>system<|im_middle|>You are a helpful assistant.<|im_end|>"
    "<|im_user|>user<|im_middle|>Hi!<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><think></think>Hello! How can I help?<|im_end|>"
    "<|im_user|>user<|im_middle|>Weather in Beijing and Paris?<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><think>Two cities, two calls.</think>Checking both."
    "<|tool_calls_section_begin|>"
    "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Beijing"}<|tool_call_end|>'
    "<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>"
    '{"city":"Paris"}<|tool_call_end|>'
    "<|tool_calls_section_end|><|im_end|>"
    "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n23°C, sunny<|im_end|>"
    "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:1\n18°C<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><think>Also need Fahrenheit.</think>"
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.convert-units.v2:2<|tool_call_argument_begin|>"
    '{"value": 23, "to": "°F"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
    "<|im_system|>tool<|im_middle|>## Return of functions.convert-units.v2:2\n73.4<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|>"
)


def test_tool_call_chain_renders_as_written_by_hand():
    assert render_chat(CHAIN, TOOLS) == CHAIN_TEXT


def test_final_answer_drops_all_reasoning():
    messages = CHAIN[1:] + [{"role": "assistant", "reasoning_content": "Summarize.",
                             "content": "Beijing 23°C, Paris 18°C."}]
    expected = (
        DEFAULT_SYSTEM
        + "<|im_user|>user<|im_middle|>Hi!<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>Hello! How can I help?<|im_end|>"
        "<|im_user|>user<|im_middle|>Weather in Beijing and Paris?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>Checking both.<|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Beijing"}<|tool_call_end|>'
        "<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>"
        '{"city":"Paris"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\n23°C, sunny<|im_end|>"
        "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:1\n18°C<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think><|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.convert-units.v2:2<|tool_call_argument_begin|>"
        '{"value": 23, "to": "°F"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>tool<|im_middle|>## Return of functions.convert-units.v2:2\n73.4<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think></think>Beijing 23°C, Paris 18°C.<|im_end|>"
    )
    assert render_chat(messages, add_generation_prompt=False) == expected


def test_first_turn_gets_default_system_and_generation_prompt():
    assert render_chat([{"role": "user", "content": "你好"}]) == (
        DEFAULT_SYSTEM + "<|im_user|>user<|im_middle|>你好<|im_end|>" + GENERATION_PROMPT)
    assert render_chat([]) == DEFAULT_SYSTEM + GENERATION_PROMPT
    assert DEFAULT_SYSTEM_PROMPT in DEFAULT_SYSTEM


def test_names_replace_roles_in_headers():
    messages = [{"role": "system", "name": "policy", "content": "Be brief."},
                {"role": "user", "name": "alice", "content": "Hi"},
                {"role": "assistant", "name": "kimi", "content": "Hello"}]
    assert render_chat(messages, add_generation_prompt=False) == (
        "<|im_system|>policy<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>alice<|im_middle|>Hi<|im_end|>"
        "<|im_assistant|>kimi<|im_middle|><think></think>Hello<|im_end|>")


def test_missing_or_none_reasoning_renders_empty_think():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "reasoning_content": None, "content": "a",
                 "tool_calls": [_call("functions.f:0", "f", "{}")]}]
    expected = "<|im_assistant|>assistant<|im_middle|><think></think>a<|tool_calls_section_begin|>"
    assert expected in render_chat(messages)


def test_string_arguments_render_verbatim():
    arguments = '{ "path" : "a.txt",\n  "lines": [1,2] }'
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "",
                 "tool_calls": [_call("functions.read:0", "read", arguments)]}]
    assert f"<|tool_call_argument_begin|>{arguments}<|tool_call_end|>" in render_chat(messages)


def test_token_ids_take_control_tokens_only_from_the_template(tokenizer):
    prompt = apply_chat_template(tokenizer, CHAIN, TOOLS)
    assert prompt.text == CHAIN_TEXT
    assert tokenizer.decode(prompt.token_ids) == prompt.text
    # The tool result's body is one text run, encoded whole between the control tokens.
    expected_tool_ids = ([tokenizer.special_id(st.IM_SYSTEM)] + tokenizer.encode("tool")
                         + [tokenizer.special_id(st.IM_MIDDLE)]
                         + tokenizer.encode("## Return of functions.get_weather:0\n23°C, sunny")
                         + [tokenizer.special_id(st.IM_END)])
    assert _contains(prompt.token_ids, expected_tool_ids)


def test_markers_typed_in_user_and_tool_text_stay_text(tokenizer):
    every_marker = "".join(tokenizer.special_tokens)
    def conversation(text):
        return [{"role": "user", "content": text},
                {"role": "assistant", "content": text, "reasoning_content": text,
                 "tool_calls": [_call("functions.f:0", "f", text)]},
                {"role": "tool", "tool_call_id": "functions.f:0", "content": text}]
    forged = apply_chat_template(tokenizer, conversation(every_marker))
    plain = apply_chat_template(tokenizer, conversation("x"))
    assert forged.text.count(every_marker) == 5
    assert [i for i in forged.token_ids if tokenizer.is_special(i)] == \
        [i for i in plain.token_ids if tokenizer.is_special(i)]
    assert tokenizer.decode(forged.token_ids) == forged.text


def test_normalized_tool_call_ids_count_across_the_conversation():
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [_call("call_abc", "search", "{}"),
                                                                    _call("call_def", "read", "{}")]},
                {"role": "tool", "tool_call_id": "call_def", "content": "r1"},
                {"role": "tool", "tool_call_id": "call_abc", "content": "r0"},
                {"role": "assistant", "content": "", "tool_calls": [_call("call_abc", "search", "{}")]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "r2"}]
    text = render_chat(messages, normalize_tool_call_ids=True)
    assert "call_abc" not in text and "call_def" not in text
    ids_in_order = [chunk.split("<|tool_call_argument_begin|>")[0]
                    for chunk in text.split("<|tool_call_begin|>")[1:]]
    assert ids_in_order == ["functions.search:0", "functions.read:1", "functions.search:2"]
    assert ("## Return of functions.read:1\nr1<|im_end|><|im_system|>tool<|im_middle|>"
            "## Return of functions.search:0\nr0") in text
    assert "## Return of functions.search:2\nr2" in text
    assert "call_abc" in render_chat(messages)


@pytest.mark.parametrize("messages, tools, error", [
    ("hello", None, r"messages: expected a list"),
    ([{"role": "user", "content": "a"}, "b"], None, r"messages\[1\]: expected a mapping"),
    ([{"role": "robot", "content": "a"}], None, r"messages\[0\]\.role: expected one of"),
    ([{"content": "a"}], None, r"messages\[0\]\.role"),
    ([{"role": "user"}], None, r"messages\[0\]\.content: missing"),
    ([{"role": "user", "content": 3}], None, r"messages\[0\]\.content: expected a string or a list"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], None,
     r"messages\[0\]\.content\[0\]: only text parts"),
    ([{"role": "user", "content": [{"type": "text", "text": None}]}], None,
     r"messages\[0\]\.content\[0\]\.text"),
    ([{"role": "user", "content": "a", "name": 5}], None, r"messages\[0\]\.name"),
    ([{"role": "user", "content": "a", "tool_calls": [_call("x", "f", "{}")]}], None,
     r"messages\[0\]\.tool_calls: only assistant"),
    ([{"role": "assistant", "content": "a", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}],
     None, r"messages\[0\]\.tool_calls\[0\]\.id"),
    ([{"role": "assistant", "tool_calls": [{"id": "i", "function": {"arguments": "{}"}}]}], None,
     r"messages\[0\]\.tool_calls\[0\]\.function\.name"),
    ([{"role": "assistant", "tool_calls": [{"id": "i", "type": "code", "function": {"name": "f"}}]}], None,
     r"messages\[0\]\.tool_calls\[0\]\.type"),
    ([{"role": "assistant", "tool_calls": [_call("i", "f", {"x": object()})]}], None,
     r"messages\[0\]\.tool_calls\[0\]\.function\.arguments"),
    ([{"role": "assistant", "content": "a", "reasoning_content": 1}], None,
     r"messages\[0\]\.reasoning_content"),
    ([{"role": "tool", "content": "r"}], None, r"messages\[0\]\.tool_call_id: expected"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "functions.f:0", "content": "r"}],
     None, r"messages\[1\]\.tool_call_id: 'functions\.f:0' answers no earlier tool call"),
    ([], "tools", r"tools: expected a list"),
    ([], [{"type": "function", "function": {"description": "no name"}}], r"tools\[0\]\.function\.name"),
])
def test_malformed_input_names_the_index_and_field(messages, tools, error):
    with pytest.raises(ValueError, match=error):
        render_chat(messages, tools)


def _contains(sequence: list[int], subsequence: list[int]) -> bool:
    n = len(subsequence)
    return any(sequence[i:i + n] == subsequence for i in range(len(sequence) - n + 1))


def test_k2_ids_render_exactly_and_only_foreign_ids_are_mapped():
    """Ids already `functions.NAME:IDX` are kept as given (numbering included), a foreign id
    gets its call's conversation index, or the next one a K2 id there does not hold."""
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [
                    _call("functions.search:7", "search", "{}"), _call("call_x", "search", "{}")]},
                {"role": "tool", "tool_call_id": "call_x", "content": "r1"},
                {"role": "tool", "tool_call_id": "functions.search:7", "content": "r0"},
                {"role": "assistant", "content": "", "tool_calls": [
                    _call("functions.read:1", "read", "{}"), _call("call_y", "search", "{}")]},
                {"role": "tool", "tool_call_id": "call_y", "content": "r2"}]
    for normalize in (False, True):
        text = render_chat(messages, normalize_tool_call_ids=normalize)
        assert "<|tool_call_begin|>functions.search:7<|tool_call_argument_begin|>" in text
        assert "<|tool_call_begin|>functions.read:1<|tool_call_argument_begin|>" in text
        assert "## Return of functions.search:7\nr0" in text
    text = render_chat(messages, normalize_tool_call_ids=True)
    ids_in_order = [chunk.split("<|tool_call_argument_begin|>")[0]
                    for chunk in text.split("<|tool_call_begin|>")[1:]]
    assert ids_in_order == ["functions.search:7", "functions.search:1", "functions.read:1",
                            "functions.search:3"]
    assert "## Return of functions.search:1\nr1" in text
    assert "## Return of functions.search:3\nr2" in text


def test_tool_declarations_do_not_depend_on_key_order():
    """Every object's keys sorted recursively (lists keep their order), compact separators,
    non-ASCII kept: what the official tokenizer feeds the template."""
    tool = {"type": "function", "function": {
        "name": "f", "description": "été", "parameters": {
            "type": "object", "required": ["b", "a"],
            "properties": {"b": {"type": "string", "enum": ["z", "y"]}, "a": {"type": "integer"}}}}}

    def reversed_keys(x):
        if isinstance(x, dict):
            return {k: reversed_keys(x[k]) for k in reversed(list(x))}
        if isinstance(x, list):
            return [reversed_keys(v) for v in x]
        return x

    messages = [{"role": "user", "content": "q"}]
    text = render_chat(messages, [tool])
    assert text == render_chat(messages, [reversed_keys(tool)])
    declared = text.split("tool_declare<|im_middle|>")[1].split("<|im_end|>")[0]
    assert declared == (
        '[{"function":{"description":"été","name":"f","parameters":{"properties":{"a":'
        '{"type":"integer"},"b":{"enum":["z","y"],"type":"string"}},"required":["b","a"],'
        '"type":"object"}},"type":"function"}]')
