"""The K2.5 family's chat templates: the renderer against a Jinja template of that layout, the
TypeScript tool declarations, and the format read from a checkpoint's template file."""

import json
from pathlib import Path

import jinja2
import pytest

from k2jax.text import load_tokenizer
from k2jax.text.chat_formats import (CHAT_FORMATS, DEFAULT_SYSTEM_PROMPT, K2_THINKING,
                                     chat_format, chat_format_of_template)
from k2jax.text.chat_template import render_chat, tool_declaration
from k2jax.text.testing import write_tiny_tiktoken_file, write_tokenizer_config
from k2jax.text.tool_declarations import typescript_declarations

K26_TEMPLATE = (Path(__file__).parent / "templates" / "k2_5.jinja").read_text()
# K2.5's template is K2.6's without the preserve_thinking flag.
K25_TEMPLATE = K26_TEMPLATE.replace(" and not preserve_thinking", "").replace(
    "{%- if not preserve_thinking -%}", "{%- if true -%}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather.\n\nIn one city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        "city": {"type": "string", "description": "City name", "maxLength": 64},
        "days": {"type": "array", "items": {"type": "integer", "minimum": 1}, "maxItems": 7}}}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "$defs": {"Filter": {"type": "object", "description": "A filter",
                                           "properties": {"field": {"type": "string"}}}},
    "properties": {"q": {"type": ["string", "null"]},
                   "filters": {"type": "array", "items": {"$ref": "#/$defs/Filter"}},
                   "extra": {"type": "object", "additionalProperties": {"type": "number"}},
                   "mode": {"anyOf": [{"type": "string"}, {"type": "boolean"}]}}}}}
CALL = {"id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATIONS = {
    "plain": [{"role": "user", "content": "hi"}],
    "system and named user": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "name": "ann", "content": "hi"}],
    "earlier answer then tool chain": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "old thought"},
        {"role": "user", "content": [{"type": "text", "text": "q2 "}, {"type": "text", "text": "now"}]},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "need weather",
         "tool_calls": [CALL, {**CALL, "id": "functions.get_weather:1",
                               "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "22 C"},
        {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "25 C"}],
}


def _jinja(template: str, messages, tools, **flags) -> str:
    env = jinja2.Environment(undefined=jinja2.Undefined)
    # transformers' `tojson`: non-ASCII kept, separators as asked
    env.filters["tojson"] = lambda value, separators=None: json.dumps(
        value, ensure_ascii=False, separators=separators)
    sorted_tools = json.loads(json.dumps(tools, sort_keys=True)) if tools else None
    kwargs = {"tools_ts_str": typescript_declarations(sorted_tools)} if tools else {}
    return env.from_string(template).render(messages=messages, tools=sorted_tools,
                                            add_generation_prompt=True, **kwargs, **flags)


FLAGS = {"default": {}, "thinking off": {"thinking": False},
         "preserve": {"preserve_thinking": True},
         "off and preserve": {"thinking": False, "preserve_thinking": True}}
# K2.5's template has no preserve_thinking flag: only K2.6's is rendered with it.
TEMPLATE_CASES = [("k2.5", K25_TEMPLATE, flags) for flags in ("default", "thinking off")] + [
    ("k2.6", K26_TEMPLATE, flags) for flags in FLAGS]


@pytest.mark.parametrize("name, template, flags", TEMPLATE_CASES,
                         ids=[f"{name} {flags}" for name, _, flags in TEMPLATE_CASES])
@pytest.mark.parametrize("tools", [None, [WEATHER, SEARCH]], ids=["no tools", "tools"])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=list(CONVERSATIONS))
def test_k25_formats_render_as_their_jinja_template(name, template, flags, tools, conversation):
    flags = FLAGS[flags]
    messages = CONVERSATIONS[conversation]
    assert chat_format_of_template(template) == chat_format(name)
    ours = render_chat(messages, tools, chat_format=chat_format(name), **flags)
    assert ours == _jinja(template, messages, tools, **flags)


def test_format_switches_read_from_template_text():
    k25 = chat_format_of_template(K25_TEMPLATE)
    assert (k25.name, k25.prefill_think, k25.typescript_tools, k25.default_system_prompt) == (
        "k2.5", True, True, False)
    k2 = chat_format_of_template(
        "{%- if messages[0]['role'] != 'system' -%}<|im_system|>system<|im_middle|>"
        f"{DEFAULT_SYSTEM_PROMPT}<|im_end|>{{%- endif -%}}..."
        "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}")
    assert k2 == K2_THINKING
    with pytest.raises(ValueError, match="not a Kimi K2 chat template"):
        chat_format_of_template("{{ '<|im_start|>' + message['role'] }}")
    with pytest.raises(ValueError, match="unknown chat template 'k9'"):
        chat_format("k9")
    assert set(CHAT_FORMATS) == {"k2-thinking", "k2.5", "k2.6"}


def test_generation_prompt_and_default_system_per_format():
    messages = CONVERSATIONS["plain"]
    k2 = render_chat(messages)
    k25 = render_chat(messages, chat_format=chat_format("k2.5"))
    assert k2.endswith("<|im_assistant|>assistant<|im_middle|>") and DEFAULT_SYSTEM_PROMPT in k2
    assert k25 == "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|><think>"
    assert render_chat(messages, chat_format=chat_format("k2.5"), thinking=False).endswith(
        "<|im_middle|><think></think>")


def test_typescript_declaration_layout():
    assert typescript_declarations([WEATHER]) == (
        "# Tools\n\n## functions\nnamespace functions {\n"
        "// Current weather.\n\n// In one city.\n"
        "type get_weather = (_: {\n"
        "  // City name\n  // maxLength: 64\n  city: string,\n"
        "  // maxItems: 7\n  days?: Array<\n    // minimum: 1\n    number\n  >,\n"
        "  // Default: \"celsius\"\n  unit?: \"celsius\" | \"fahrenheit\"\n"
        "}) => any;\n}\n")
    search = typescript_declarations([SEARCH])
    assert "// A filter\ninterface Filter {\n  field?: string\n}\ntype search = (_: {" in search
    assert "  extra?: {\n    [k: string]: number\n  },\n  filters?: Array<Filter>,\n" in search
    assert "  mode?: string | boolean,\n  q?: string | null\n}) => any;" in search
    assert typescript_declarations([{"type": "_plugin", "_plugin": {}}]) == ""


def test_unsupported_schemas_fall_back_to_json():
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/Missing"}}}}}
    declared = tool_declaration([bad], chat_format("k2.5"))
    assert json.loads(declared) == [bad] and "," in declared and ", " not in declared
    assert tool_declaration([WEATHER], chat_format("k2.5")).startswith("# Tools")
    assert tool_declaration([WEATHER], K2_THINKING).startswith('[{"function":')


def test_tokenizer_carries_the_checkpoint_template(tmp_path):
    write_tiny_tiktoken_file(tmp_path)
    assert load_tokenizer(tmp_path).chat_format == K2_THINKING
    (tmp_path / "chat_template.jinja").write_text(K25_TEMPLATE)
    assert load_tokenizer(tmp_path).chat_format == chat_format("k2.5")
    (tmp_path / "chat_template.jinja").unlink()
    write_tokenizer_config(tmp_path, 512, chat_template=K26_TEMPLATE)
    assert load_tokenizer(tmp_path).chat_format == chat_format("k2.6")
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.warns(UserWarning, match="chat_template.jinja: not a Kimi K2 chat template"):
        assert load_tokenizer(tmp_path).chat_format == K2_THINKING
