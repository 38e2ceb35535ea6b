"""Hypothesis strategies for hostile request bodies: built from the server's real request schema
(`serve.openai_protocol`) with every value pushed to its edges (huge and negative numbers,
NaN and infinities, wrong types, deep nesting, invalid UTF-8 and lone surrogates, control
strings, empty and long lists), then sometimes damaged as bytes.

`request_bodies(model)` draws `(path, body_bytes)` for `/v1/chat/completions` or
`/v1/completions`.
"""

import json

from hypothesis import strategies as st

INT_EDGES = [0, 1, -1, 2, 3, 16, 17, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**32, 2**63,
             -2**63, 10**30]
FLOAT_EDGES = [0.0, -0.0, 1e-300, 0.5, 1.0, 2.0, 2.0000001, 100.0, 1e38, 3.5e38, 1e308,
               -1.0, -2.0, -1e308]
CONTROL_TEXTS = ["<|im_end|>", "<|im_user|>", "<think>", "</think>", "<|tool_calls_section_begin|>",
                 "<|tool_call_begin|>", "functions.x:0", "[EOS]", "\x00", "\u2028", "\ufeff",
                 "\U0010ffff", "\\ud800", "data: [DONE]\n\n", "%s%n", "{{x}}"]

texts = st.one_of(st.text(max_size=40), st.sampled_from(CONTROL_TEXTS),
                  st.text(alphabet=st.sampled_from(["a", " ", "\n", "é", "😀"]), max_size=300))
ints = st.one_of(st.sampled_from(INT_EDGES), st.integers())
floats = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(allow_nan=True, allow_infinity=True))
json_scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)), max_leaves=12)


def _edge(good):
    """A field's value: usually of the right kind (edges included), sometimes anything."""
    return st.one_of(good, good, good, json_values)


content = st.one_of(texts, st.none(), st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]), "text": texts}),
    json_values), max_size=3))
tool_call = st.fixed_dictionaries(
    {"id": _edge(texts), "type": _edge(st.just("function")),
     "function": _edge(st.fixed_dictionaries({"name": _edge(texts),
                                              "arguments": _edge(texts)}))})
message = st.fixed_dictionaries(
    {"role": _edge(st.sampled_from(["system", "user", "assistant", "tool", "developer", ""]))},
    optional={"content": content, "name": _edge(texts), "reasoning_content": _edge(texts),
              "tool_calls": _edge(st.lists(tool_call, max_size=3)),
              "tool_call_id": _edge(texts)})
tool = st.fixed_dictionaries(
    {"type": _edge(st.just("function")),
     "function": _edge(st.fixed_dictionaries(
         {"name": _edge(texts)}, optional={"description": _edge(texts),
                                           "parameters": json_values}))})

bias_keys = st.one_of(st.integers(-5, 2**40).map(str), texts, st.sampled_from(["0", "00", "1e3",
                                                                              " 5", "+5", "٣"]))
named_choice = st.fixed_dictionaries({"type": _edge(st.just("function")), "function": _edge(
    st.fixed_dictionaries({"name": _edge(texts)}))})
SAMPLING_FIELDS = {
    "max_tokens": _edge(ints), "temperature": _edge(floats), "top_p": _edge(floats),
    "n": _edge(ints), "stop": _edge(st.one_of(texts, st.lists(texts, max_size=20))),
    "seed": _edge(ints), "presence_penalty": _edge(floats), "frequency_penalty": _edge(floats),
    "stream": _edge(st.booleans()),
    "stream_options": _edge(st.fixed_dictionaries({"include_usage": _edge(st.booleans())})),
    "user": _edge(texts), "top_k": _edge(ints), "min_p": _edge(floats),
    "repetition_penalty": _edge(floats), "stop_token_ids": _edge(st.lists(ints, max_size=70)),
    "logit_bias": _edge(st.dictionaries(bias_keys, _edge(floats), max_size=6)),
}
CHAT_FIELDS = {
    **SAMPLING_FIELDS, "tools": _edge(st.lists(tool, max_size=3)),
    "tool_choice": _edge(st.one_of(st.sampled_from(["auto", "none", "required"]), named_choice)),
    "parallel_tool_calls": _edge(st.booleans()),
    "response_format": _edge(st.fixed_dictionaries({"type": _edge(st.sampled_from(
        ["text", "json_object", "json_schema"]))})),
    "chat_template_kwargs": _edge(st.dictionaries(
        st.sampled_from(["thinking", "enable_thinking", "x"]), json_values, max_size=2)),
    "max_completion_tokens": _edge(ints), "logprobs": _edge(st.booleans()),
    "top_logprobs": _edge(ints),
    "heavy": _edge(st.fixed_dictionaries({"n": _edge(ints)})),
    "reasoning_effort": json_values, "metadata": json_values,  # accepted and ignored
    "functions": json_values,  # not a field of this API
}
token_lists = st.lists(ints, max_size=20)
COMPLETION_FIELDS = {**SAMPLING_FIELDS, "echo": _edge(st.booleans()), "logprobs": _edge(ints)}
prompts = _edge(st.one_of(texts, token_lists, st.lists(texts, max_size=4),
                          st.lists(token_lists, max_size=4)))


def _damage(body: bytes, draw) -> bytes:
    """The JSON bytes, sometimes damaged: truncated, invalid UTF-8, a lone surrogate, nested
    past any sane depth, or not an object."""
    kind = draw(st.sampled_from(["none"] * 6 + ["truncate", "bad_utf8", "surrogate", "deep",
                                                "array", "bom"]))
    if kind == "truncate":
        return body[:draw(st.integers(0, max(len(body) - 1, 0)))]
    if kind == "bad_utf8":
        at = draw(st.integers(0, len(body)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]))
        return body[:at] + junk + body[at:]
    if kind == "surrogate":
        return body.replace(b'"user"', b'"\\ud800"', 1).replace(b'"x"', b'"\\udfff x"', 1)
    if kind == "deep":
        depth = draw(st.sampled_from([100, 1000, 100_000]))
        return body[:-1] + b', "messages": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "array":
        return b"[" + body + b"]"
    if kind == "bom":
        return b"\xef\xbb\xbf" + body
    return body


def _within(low, high, edges):
    return st.one_of(st.sampled_from([e for e in edges if low <= e <= high]),
                     st.integers(low, high) if isinstance(low, int) else
                     st.floats(low, high, allow_nan=False))


# Values the server accepts, at the edges of their ranges: requests built from these reach the
# engine, so that its arrays meet the extremes validation lets through.
VALID_FIELDS = {
    "max_tokens": st.one_of(st.integers(1, 8), _within(1, 2**31 - 1, INT_EDGES)),
    "temperature": _within(0.0, 2.0, FLOAT_EDGES),
    "top_p": _within(1e-300, 1.0, FLOAT_EDGES), "n": st.integers(1, 3),
    "seed": _within(0, 2**31 - 1, INT_EDGES), "top_k": _within(-1, 2**31 - 1, INT_EDGES),
    "min_p": _within(0.0, 1.0, FLOAT_EDGES),
    "presence_penalty": _within(-2.0, 2.0, FLOAT_EDGES),
    "frequency_penalty": _within(-2.0, 2.0, FLOAT_EDGES),
    "repetition_penalty": _within(1e-300, 100.0, FLOAT_EDGES),
    "stop": st.one_of(st.sampled_from(CONTROL_TEXTS), st.lists(
        st.text(min_size=1, max_size=8), max_size=4)),
    "stop_token_ids": st.lists(st.integers(0, 300), max_size=8),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logit_bias": st.dictionaries(st.integers(0, 511).map(str),
                                  _within(-100.0, 100.0, FLOAT_EDGES + [100.0, -100.0]),
                                  max_size=4),
}
# Valid for chat only: logprobs, tool choices (the tool is short enough to fit the prompt
# limit), thinking off, and fields accepted and ignored.
VALID_CHAT_FIELDS = {
    "logprobs": st.just(True), "top_logprobs": st.integers(0, 20),
    "tools": st.just([{"function": {"name": "f"}}]),
    "tool_choice": st.sampled_from(["auto", "none", "required",
                                    {"type": "function", "function": {"name": "f"}}]),
    "parallel_tool_calls": st.booleans(), "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    "chat_template_kwargs": st.fixed_dictionaries({"thinking": st.booleans()}),
    "reasoning_effort": st.sampled_from(["low", "high"]), "user": texts,
}
# Valid for completions only.
VALID_COMPLETION_FIELDS = {"logprobs": st.integers(0, 5)}


@st.composite
def _plausible_body(draw, model: str, chat: bool) -> dict:
    body = {"model": model}
    if chat:
        body["messages"] = [{"role": "system", "content": "."},
                            {"role": "user", "content": draw(texts)}]
    else:
        body["prompt"] = draw(st.one_of(texts, st.lists(st.integers(0, 255), min_size=1,
                                                         max_size=20)))
    valid = {**VALID_FIELDS, **(VALID_CHAT_FIELDS if chat else VALID_COMPLETION_FIELDS)}
    for name in draw(st.lists(st.sampled_from(sorted(valid)), unique=True, max_size=6)):
        body[name] = draw(valid[name])
    return body


@st.composite
def request_bodies(draw, model: str):
    """`(path, body)`: a chat or text completion request for `model`, possibly hostile: a
    third are valid requests with extreme values, the rest anything."""
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if draw(st.sampled_from(["plausible", "hostile"])) == "plausible":
        return path, json.dumps(draw(_plausible_body(model, chat))).encode()
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=5))
    body = {"model": model if draw(st.integers(0, 3)) else draw(json_values)}
    if chat:
        body["messages"] = draw(_edge(st.lists(message, min_size=1, max_size=4)))
    else:
        body["prompt"] = draw(prompts)
    for name in chosen:
        body[name] = draw(fields[name])
    encoded = json.dumps(body, allow_nan=True, ensure_ascii=draw(st.booleans())).encode(
        "utf-8", errors="surrogatepass")
    return path, _damage(encoded, draw)

