"""K2 Thinking's chat template, in Python: OpenAI-style messages (and tools) to prompt text and ids.
The K2.5 family's templates are variants of it (`chat_format`, see `k2jax.text.chat_formats`).

The layout, as the released template writes it (see shared/K2_FORMAT.md):
- no BOS and nothing between messages; each message is `HEADER BODY <|im_end|>` with header
  `<|im_user|>NAME<|im_middle|>`, `<|im_assistant|>NAME<|im_middle|>` or, for every other role,
  `<|im_system|>NAME<|im_middle|>`; NAME is the message's `name`, else its role;
- tools first, as `<|im_system|>tool_declare<|im_middle|>` + compact JSON + `<|im_end|>`;
- a default system message unless the first message is one;
- assistant bodies `<think>REASONING</think>CONTENT` + tool-call section, with reasoning kept only
  after the last assistant message that has no tool calls (earlier ones get `<think></think>`);
- tool results `## Return of TOOL_CALL_ID\\nCONTENT`;
- the generation prompt `<|im_assistant|>assistant<|im_middle|>`; with `thinking=False` (not a
  switch of K2 Thinking's template, which has none: the K2.5/K2.6 templates' `thinking` flag)
  followed by `<think></think>`, so that the model answers without reasoning.

The renderer keeps control tokens apart from text, so the ids come from the template's own control
tokens and `tokenizer.encode` of everything else: text from users, tools or the model can never
become a control token, whatever it contains.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from k2jax.text import special_tokens as st
from k2jax.text.chat_formats import DEFAULT_SYSTEM_PROMPT, K2_THINKING, ChatFormat
from k2jax.text.tool_call_ids import is_k2_tool_call_id
from k2jax.text.tool_declarations import UnsupportedSchema, typescript_declarations
ROLES = ("system", "user", "assistant", "tool")
_HEADER_TOKEN = {"user": st.IM_USER, "assistant": st.IM_ASSISTANT}


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: its text and its token ids (`decode(token_ids) == text`)."""
    text: str
    token_ids: list[int]


class _Segments:
    """Rendered output as a sequence of ordinary text runs and control tokens."""

    def __init__(self):
        self.parts: list[tuple[bool, str]] = []  # (is_control_token, text)

    def text(self, text: str) -> None:
        # Adjacent text is one run: BPE of a concatenation differs from concatenated BPEs.
        if not text:
            return
        if self.parts and not self.parts[-1][0]:
            self.parts[-1] = (False, self.parts[-1][1] + text)
        else:
            self.parts.append((False, text))

    def control(self, token: str) -> None:
        self.parts.append((True, token))


def render_chat(messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None, *,
                add_generation_prompt: bool = True, normalize_tool_call_ids: bool = False,
                thinking: bool = True, preserve_thinking: bool = False,
                chat_format: ChatFormat = K2_THINKING) -> str:
    """The prompt text for `messages` (and `tools`), as K2 Thinking's template renders it.

    Args:
      messages: OpenAI chat messages (`role`, `content` as a string or a list of text parts,
        optional `name`; assistant `reasoning` or `reasoning_content` (`reasoning` wins when
        both are set) and `tool_calls`; tool `tool_call_id`).
      tools: OpenAI tool declarations, rendered in compact JSON with every object's keys sorted
        recursively, as the official tokenizer does.
      add_generation_prompt: end with the header of the assistant turn to generate.
      normalize_tool_call_ids: rewrite each foreign tool-call id (one not already
        `functions.NAME:IDX`, e.g. OpenAI's `call_xxx`) and the results that answer it as
        `functions.NAME:IDX`, IDX the call's index in the conversation (the next free one if a
        K2 id there already has it); ids in K2's form render exactly as given. K2 degrades over
        turns when the history holds ids of another shape. Off by default: every id renders
        verbatim, as the released template does.
      thinking: False pre-fills an empty `<think></think>` after the generation prompt (and,
        in the K2.5 formats, empties the reasoning of the current tool chain's turns).
      preserve_thinking: every assistant turn keeps its reasoning (K2.6's flag).
      chat_format: which of the family's templates (`k2jax.text.chat_formats`).
    Raises:
      ValueError: a malformed message or tool, naming its index and field.
    """
    segments = _render(messages, tools, add_generation_prompt, normalize_tool_call_ids, thinking,
                       preserve_thinking, chat_format)
    return "".join(text for _, text in segments.parts)


def apply_chat_template(tokenizer, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
                        *, add_generation_prompt: bool = True,
                        normalize_tool_call_ids: bool = False, thinking: bool = True,
                        preserve_thinking: bool = False,
                        chat_format: ChatFormat | None = None) -> ChatPrompt:
    """`render_chat` plus token ids from `tokenizer` (a `k2jax.text.tokenizer.K2Tokenizer`); the
    format defaults to the tokenizer's (its checkpoint's template, as `load_tokenizer` read it)."""
    chat_format = chat_format or getattr(tokenizer, "chat_format", K2_THINKING)
    segments = _render(messages, tools, add_generation_prompt, normalize_tool_call_ids, thinking,
                       preserve_thinking, chat_format)
    token_ids = []
    for is_control, text in segments.parts:
        if is_control:
            token_ids.append(tokenizer.special_id(text))
        else:
            token_ids.extend(tokenizer.encode(text))
    return ChatPrompt("".join(text for _, text in segments.parts), token_ids)


def tool_declaration(tools: Sequence[Mapping], chat_format: ChatFormat = K2_THINKING) -> str:
    """The body of the `tool_declare` turn. The official tokenizers sort every object's keys
    (recursively) first, so the bytes do not depend on the caller's key order; then K2 Thinking
    writes compact JSON, K2.5 a TypeScript-style declaration (JSON when that fails)."""
    ordered = json.loads(json.dumps(list(tools), sort_keys=True))
    if chat_format.typescript_tools:
        try:
            declaration = typescript_declarations(ordered)
        except UnsupportedSchema:
            declaration = ""
        if declaration:
            return declaration
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))


def _render(messages, tools, add_generation_prompt, normalize_tool_call_ids, thinking=True,
            preserve_thinking=False, chat_format: ChatFormat = K2_THINKING) -> _Segments:
    _check_tools(tools)
    _check_messages(messages)
    call_ids = _tool_call_ids(messages, normalize_tool_call_ids)
    out = _Segments()
    if tools:
        _header(out, st.IM_SYSTEM, "tool_declare")
        out.text(tool_declaration(tools, chat_format))
        out.control(st.IM_END)
    if chat_format.default_system_prompt and (not messages or messages[0]["role"] != "system"):
        _header(out, st.IM_SYSTEM, "system")
        out.text(DEFAULT_SYSTEM_PROMPT)
        out.control(st.IM_END)
    last_plain_answer = -1 if preserve_thinking else max(
        (i for i, m in enumerate(messages) if m["role"] == "assistant" and not m.get("tool_calls")),
        default=-1)
    keeps_reasoning = thinking or preserve_thinking or not chat_format.thinking_off_drops_reasoning
    for index, message in enumerate(messages):
        role = message["role"]
        _header(out, _HEADER_TOKEN.get(role, st.IM_SYSTEM), message.get("name") or role)
        if role == "assistant":
            reasoning = (assistant_reasoning(message)
                         if index > last_plain_answer and keeps_reasoning else None)
            out.control(st.THINK_BEGIN)
            out.text(reasoning or "")
            out.control(st.THINK_END)
            out.text(_content_text(message))
            if message.get("tool_calls"):
                rendered_ids = [call_ids[(index, k)] for k in range(len(message["tool_calls"]))]
                _tool_calls(out, message["tool_calls"], rendered_ids)
        elif role == "tool":
            out.text(f"## Return of {call_ids[(index, None)]}\n{_content_text(message)}")
        else:
            out.text(_content_text(message))
        out.control(st.IM_END)
    if add_generation_prompt:
        _header(out, st.IM_ASSISTANT, "assistant")
        if not thinking:
            out.control(st.THINK_BEGIN)
            out.control(st.THINK_END)
        elif chat_format.prefill_think:
            out.control(st.THINK_BEGIN)
    return out


def assistant_reasoning(message: Mapping) -> str | None:
    """An assistant message's reasoning: `reasoning` (vLLM's current name) when set, else
    `reasoning_content` (DeepSeek's, and vLLM's earlier one)."""
    reasoning = message.get("reasoning")
    return reasoning if reasoning is not None else message.get("reasoning_content")


def _header(out: _Segments, role_token: str, name: str) -> None:
    out.control(role_token)
    out.text(name)
    out.control(st.IM_MIDDLE)


def _tool_calls(out: _Segments, tool_calls, rendered_ids) -> None:
    out.control(st.TOOL_CALLS_SECTION_BEGIN)
    for call, rendered_id in zip(tool_calls, rendered_ids):
        arguments = call["function"].get("arguments", "")
        out.control(st.TOOL_CALL_BEGIN)
        out.text(rendered_id)
        out.control(st.TOOL_CALL_ARGUMENT_BEGIN)
        # Strings render verbatim; other values as the HF template's `tojson` writes them.
        out.text(arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))
        out.control(st.TOOL_CALL_END)
    out.control(st.TOOL_CALLS_SECTION_END)


def _content_text(message: Mapping) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def _tool_call_ids(messages, normalize: bool) -> dict[tuple[int, int | None], str]:
    """The id to render for each call, keyed `(message index, call index)`, and for each tool
    result, keyed `(message index, None)`: as given, or, normalizing, foreign ids K2-shaped."""
    taken = {call["id"] for m in messages if m["role"] == "assistant"
             for call in m.get("tool_calls") or () if is_k2_tool_call_id(call["id"])}
    ids, renamed, count = {}, {}, 0
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            for k, call in enumerate(message.get("tool_calls") or ()):
                rendered = call["id"]
                if normalize and not is_k2_tool_call_id(rendered):
                    name, slot = call["function"]["name"], count
                    while f"functions.{name}:{slot}" in taken:
                        slot += 1
                    rendered = f"functions.{name}:{slot}"
                    taken.add(rendered)
                ids[(index, k)] = rendered
                # A result answers the latest call with its id (clients sometimes reuse ids).
                renamed[call["id"]] = rendered
                count += 1
        elif message["role"] == "tool":
            ids[(index, None)] = renamed[message["tool_call_id"]]
    return ids


def _check_tools(tools) -> None:
    if tools is None:
        return
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools: expected a list of tool declarations, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{i}].function.name: expected a string (OpenAI tool declaration)")
        try:
            json.dumps(tool)
        except (TypeError, ValueError) as e:
            raise ValueError(f"tools[{i}]: not JSON-serializable ({e})") from None


def _check_messages(messages) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages: expected a list of messages, got {type(messages).__name__}")
    called_ids = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}")
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise ValueError(f"{where}.name: expected a string")
        _check_content(message.get("content"), f"{where}.content", optional=role == "assistant")
        if role == "assistant":
            for name in ("reasoning", "reasoning_content"):
                if not isinstance(message.get(name) or "", str):
                    raise ValueError(f"{where}.{name}: expected a string")
            called_ids.update(_check_tool_calls(message.get("tool_calls"), f"{where}.tool_calls"))
        elif message.get("tool_calls"):
            raise ValueError(f"{where}.tool_calls: only assistant messages make tool calls")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise ValueError(f"{where}.tool_call_id: expected the id of the call it answers")
            if call_id not in called_ids:
                raise ValueError(f"{where}.tool_call_id: {call_id!r} answers no earlier tool call")


def _check_content(content, where: str, optional: bool) -> None:
    if content is None:
        if not optional:
            raise ValueError(f"{where}: missing")
        return
    if isinstance(content, str):
        return
    if not isinstance(content, Sequence):
        raise ValueError(f"{where}: expected a string or a list of text parts")
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type", "text") != "text":
            raise ValueError(f"{where}[{j}]: only text parts are supported (K2 is text-only)")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}[{j}].text: expected a string")


def _check_tool_calls(tool_calls, where: str) -> list[str]:
    if tool_calls is None:
        return []
    if isinstance(tool_calls, (str, bytes)) or not isinstance(tool_calls, Sequence):
        raise ValueError(f"{where}: expected a list")
    ids = []
    for k, call in enumerate(tool_calls):
        if not isinstance(call, Mapping) or not isinstance(call.get("id"), str) or not call["id"]:
            raise ValueError(f"{where}[{k}].id: expected a non-empty string")
        if call.get("type", "function") != "function":
            raise ValueError(f"{where}[{k}].type: expected 'function', got {call['type']!r}")
        function = call.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where}[{k}].function.name: expected a string")
        try:
            json.dumps(function.get("arguments", ""))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}[{k}].function.arguments: not JSON-serializable ({e})") from None
        ids.append(call["id"])
    return ids
