"""The chat templates of the K2 family, as the few switches in which they differ.

K2 Thinking's template and the later K2.5 / K2.6 / K2.7-Code ones share the layout (headers,
`<think>` blocks, tool-call sections, tool results); they differ in:
- a default system message ("You are Kimi, ...") when the conversation opens without one
  (K2 Thinking's template adds it; K2.5's does not);
- the generation prompt: K2 Thinking's ends at `<|im_middle|>` and the model writes `<think>`;
  K2.5's pre-fills `<think>` (or `<think></think>` with `thinking` off);
- the `tool_declare` turn: K2 Thinking's is the tools as compact JSON; K2.5's tokenizer passes a
  TypeScript-style declaration (`k2jax.text.tool_declarations`), JSON where that fails;
- with `thinking` off, K2.5's template drops the reasoning of the current tool chain's assistant
  turns too (`<think></think>`), not only the generation prompt's;
- K2.6 adds `preserve_thinking`: every assistant turn keeps its reasoning.

A checkpoint's own template file says which it is (`chat_format_of_template`), so
`k2jax.text.load_tokenizer` reads `chat_template.jinja` (or `tokenizer_config.json`'s
`chat_template`) beside the tokenizer and renders as that checkpoint was trained.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
TEMPLATE_FILE_NAME = "chat_template.jinja"


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """One K2 chat template's switches (see the module docstring)."""

    name: str
    default_system_prompt: bool = True
    prefill_think: bool = False
    typescript_tools: bool = False
    thinking_off_drops_reasoning: bool = False


K2_THINKING = ChatFormat("k2-thinking")
K2_5 = ChatFormat("k2.5", default_system_prompt=False, prefill_think=True,
                  typescript_tools=True, thinking_off_drops_reasoning=True)
CHAT_FORMATS = {"k2-thinking": K2_THINKING, "k2.5": K2_5,
                "k2.6": dataclasses.replace(K2_5, name="k2.6")}


def chat_format(name: str) -> ChatFormat:
    try:
        return CHAT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; choose one of "
                         f"{', '.join(CHAT_FORMATS)}") from None


def chat_format_of_template(template: str, where: str = "chat template") -> ChatFormat:
    """The switches a K2-family Jinja template sets, read from its text."""
    if "<|im_assistant|>" not in template or "<|im_middle|>" not in template:
        raise ValueError(f"{where}: not a Kimi K2 chat template (no <|im_assistant|> or "
                         "<|im_middle|> header)")
    generation_prompt = template[template.rfind("add_generation_prompt"):]
    prefill = "add_generation_prompt" in template and "<think>" in generation_prompt
    name = ("k2.6" if "preserve_thinking" in template else "k2.5") if prefill else "k2-thinking"
    return ChatFormat(name, default_system_prompt=DEFAULT_SYSTEM_PROMPT in template,
                      prefill_think=prefill, typescript_tools="tools_ts_str" in template,
                      thinking_off_drops_reasoning=prefill)


def chat_format_of_directory(directory: str | os.PathLike) -> ChatFormat | None:
    """The format of the template a checkpoint directory ships (`chat_template.jinja`, else
    `tokenizer_config.json`'s `chat_template`), or None when it ships none. A template that is
    not a K2 one gives None too, with a warning naming the file (then K2 Thinking's format is
    used unless one is chosen, e.g. `k2jax serve --chat-template`)."""
    try:
        return _chat_format_of_directory(directory)
    except ValueError as e:
        warnings.warn(f"{e}; rendering prompts in the k2-thinking format", stacklevel=2)
        return None


def _chat_format_of_directory(directory) -> ChatFormat | None:
    path = os.path.join(directory, TEMPLATE_FILE_NAME)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return chat_format_of_template(f.read(), path)
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
        except (ValueError, UnicodeDecodeError, AttributeError):
            return None  # reported by the tokenizer, which reads the same file
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        if isinstance(template, str):
            return chat_format_of_template(template, f"{config_path}: chat_template")
    return None
