"""The OpenAI wire format: request validation, and the JSON of responses and stream chunks.

Requests are pydantic models with `extra="forbid"` and strict JSON types: an unknown or
unsupported parameter is a 400 that names it. The one exception is `IGNORED_FIELDS`: OpenAI
parameters that change nothing a self-hosted model can honour (`user`, `metadata`, `store`,
`service_tier`, `reasoning_effort`, ...), which agent frameworks send by default; they are
accepted, ignored, and named in one logged warning per request (`ignored_fields`), as vLLM does.
Ranges are OpenAI's (temperature in [0, 2], penalties in [-2, 2], n >= 1, top_logprobs in
[0, 20], completions' logprobs in [0, 5], logit_bias values in [-100, 100], at most 300).
Beside OpenAI's parameters the server takes vLLM's extensions (`top_k`, `min_p`,
`repetition_penalty`, `stop_token_ids`, `chat_template_kwargs`), which the `openai` client sends
through `extra_body`, and `heavy` (see `serve.heavy`).

Responses are plain dicts shaped as OpenAI's: `chat.completion` / `chat.completion.chunk`
(with `reasoning_content` beside `content`, as DeepSeek's and vLLM's servers send it) and
`text_completion`; logprobs in OpenAI's shapes (`chat_logprobs`, `completion_logprobs`).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      create_model, model_validator)

from serve.sampling import LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, SamplingParams

MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_PROMPTS = 256
# Counts, lengths and seeds travel to the engine in int32 arrays.
INT32_MAX = 2**31 - 1
MAX_REPETITION_PENALTY = 100.0
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for /v1/completions
# A logprob JSON can carry (it has no -inf); vLLM reports the same floor.
LOGPROB_FLOOR = -9999.0

# OpenAI parameters accepted and ignored, with one logged warning per request naming them:
# they concern OpenAI's platform (storage, billing tiers, end-user ids, output modalities,
# predicted outputs, built-in web search) or effort/verbosity knobs K2 Thinking has no switch
# for. `functions` / `function_call` (the deprecated tool API) stay 400s: ignoring them would
# quietly drop the tools the client offers.
IGNORED_FIELDS = {
    "chat": ("user", "metadata", "store", "service_tier", "reasoning_effort", "modalities",
             "prediction", "web_search_options", "verbosity", "prompt_cache_key",
             "safety_identifier"),
    "completions": ("user",),
}


class ProtocolError(Exception):
    """A request the server refuses: sent as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    # JSON's NaN and 1e999 (inf) parse as floats; no sampling parameter means anything with them.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        # Many clients send `"stop": null` for parameters they leave unset.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
# The vocabulary bound is the model's, checked by the server; this one keeps ids in int32.
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


def _ignoring(kind: str) -> type[_Strict]:
    """A base model holding `IGNORED_FIELDS[kind]`, any JSON value each."""
    fields = {name: (Any, None) for name in IGNORED_FIELDS[kind]}
    return create_model(f"_Ignored{kind.title()}", __base__=_Strict, **fields)


def ignored_fields(request: _Strict) -> list[str]:
    """The ignored parameters this request set (not null), for the warning."""
    ignored = {name for names in IGNORED_FIELDS.values() for name in names}
    return sorted(ignored & request.model_fields_set)


class StreamOptions(_Strict):
    include_usage: bool = False


class HeavyOptions(_Strict):
    """Heavy mode: `n` candidate answers, then one aggregation pass (see `serve.heavy`)."""

    n: int = Field(ge=2, le=MAX_N)


BiasValue = Annotated[float, Field(ge=-LOGIT_BIAS_RANGE, le=LOGIT_BIAS_RANGE)]


class _SamplingRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: StopString | list[StopString] | None = Field(None, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(None, ge=0, lt=2**31)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, BiasValue] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    # vLLM's extensions
    top_k: int = Field(0, ge=-1, le=INT32_MAX)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=MAX_REPETITION_PENALTY)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)


class _NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: _NamedFunction


class ResponseFormat(_Strict):
    type: Literal["text", "json_object"]


class ChatTemplateKwargs(_Strict):
    """vLLM's `chat_template_kwargs`: the flags of the K2.5 / K2.6 templates, which the renderer
    implements for every format: `thinking` (false pre-fills `<think></think>`) and
    `preserve_thinking` (every assistant turn keeps its reasoning)."""

    thinking: bool = True
    preserve_thinking: bool = False


class ChatCompletionRequest(_SamplingRequest, _ignoring("chat")):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    heavy: HeavyOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def engine_logprobs(self) -> int | None:
        """The engine's `logprobs`: None, or how many top alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


def _prompt_kind(value) -> str | None:
    """Which form of prompt `value` is, told by its first element, so that an error speaks of
    that form alone (`[2147483648]` is a token id out of range, not "not a string")."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else 0
    return {str: "texts", list: "id_lists"}.get(type(first), "ids")


Prompt = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[TokenId], Tag("ids")]
    | Annotated[list[str], Field(max_length=MAX_PROMPTS), Tag("texts")]
    | Annotated[list[list[TokenId]], Field(max_length=MAX_PROMPTS), Tag("id_lists")],
    Discriminator(_prompt_kind, custom_error_type="prompt_type",
                  custom_error_message="Input should be a string, a list of token ids, a list "
                  "of strings or a list of token id lists")]


class CompletionRequest(_SamplingRequest, _ignoring("completions")):
    prompt: Prompt
    echo: Literal[False] = False
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)  # OpenAI's default
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    def engine_logprobs(self) -> int | None:
        return self.logprobs


_UNION_MEMBER_TAGS = {"str", "int", "float", "bool", "list", "dict", "text", "ids", "texts",
                      "id_lists", "NamedToolChoice"}


def _error_path(loc) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in _UNION_MEMBER_TAGS:
            path += f".{part}" if path else part
    return path


def parse_request(body: bytes, model_cls: type[_Strict]):
    """Validates a JSON body into `model_cls`; raises a 400 `ProtocolError` naming the field.

    Whatever the bytes, the outcome is the request or a `ProtocolError`: pydantic's JSON
    parser bounds nesting depth (no RecursionError) and refuses invalid UTF-8 and lone
    surrogates, which could not be encoded later.
    """
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            detail = first["ctx"]["error"] if "ctx" in first else first["msg"]
            if "recursion limit" in detail:
                detail = f"nested too deeply ({detail})"
            raise ProtocolError(400, f"request body is not valid JSON: {detail}") from None
        path = _error_path(first["loc"])
        if first["type"] == "extra_forbidden":
            raise ProtocolError(400, f"unsupported parameter {path!r}", path) from None
        if not first["loc"]:
            raise ProtocolError(400, "request body must be a JSON object") from None
        # A union field fails once per member. The member that got furthest into the value
        # is the one meant (`"stop": [""]` is a list with an empty string, not "not a
        # string"); among equals, say what each wanted.
        field = first["loc"][0]
        same_field = [err for err in errors if err["loc"][:1] == (field,)]
        deepest = max(len(_error_path(err["loc"])) for err in same_field)
        chosen = [err for err in same_field if len(_error_path(err["loc"])) == deepest]
        path = _error_path(chosen[0]["loc"])
        wanted = dict.fromkeys(err["msg"] for err in chosen if _error_path(err["loc"]) == path)
        raise ProtocolError(400, f"{path}: {' or '.join(wanted)}", path) from None


def requested_max_tokens(request: _SamplingRequest) -> int | None:
    """`max_tokens`, or chat's newer `max_completion_tokens`; both must agree when given."""
    limit = request.max_tokens
    extra = getattr(request, "max_completion_tokens", None)
    if extra is not None:
        if limit is not None and limit != extra:
            raise ProtocolError(400, "max_tokens and max_completion_tokens differ",
                                "max_completion_tokens")
        limit = extra
    return limit


def logit_bias_pairs(request: _SamplingRequest, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as `(token id, bias)` pairs; keys must be decimal ids in the vocabulary."""
    pairs = []
    for key, bias in (request.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
            raise ProtocolError(400, f"logit_bias: keys must be token ids in [0, {vocab_size}) "
                                f"written as decimal strings, got {key[:40]!r}", "logit_bias")
        pairs.append((int(key), bias))
    if len({token for token, _ in pairs}) < len(pairs):
        raise ProtocolError(400, "logit_bias: a token id is given twice", "logit_bias")
    return tuple(pairs)


def sampling_params(request: _SamplingRequest, max_new_tokens: int, *, n: int | None = None,
                    stop_token_ids: tuple[int, ...] = (), vocab_size: int = INT32_MAX,
                    constraint=None) -> SamplingParams:
    """The engine's parameters for a validated request (`n` overrides the request's);
    `constraint` is a `SamplingParams.constraint` factory."""
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    bias = logit_bias_pairs(request, vocab_size)
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=request.temperature, top_p=request.top_p,
            top_k=request.top_k, min_p=request.min_p,
            repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, n=n or request.n, stop=tuple(stop),
            stop_token_ids=tuple(request.stop_token_ids or ()) + stop_token_ids,
            seed=request.seed, logprobs=request.engine_logprobs(), logit_bias=bias,
            constraint=constraint)
    except ValueError as e:
        raise ProtocolError(400, str(e)) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseHeader:
    """The fields every response and chunk of one request repeats."""

    def __init__(self, prefix: str, model: str):
        self.id, self.model, self.created = new_id(prefix), model, int(time.time())

    def chat_completion(self, choices: list[dict], usage_: dict, **extra) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": usage_, **extra}

    def chat_chunk(self, index: int, delta: dict, reason: str | None = None,
                   logprobs: dict | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [{"index": index, "delta": delta,
                                                  "logprobs": logprobs, "finish_reason": reason}]}

    def chat_usage_chunk(self, usage_: dict) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": usage_}

    def completion(self, choices: list[dict], usage_: dict) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": usage_}

    def completion_chunk(self, index: int, text: str, reason: str | None = None,
                         logprobs: dict | None = None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": [{"index": index, "text": text,
                                                  "logprobs": logprobs, "finish_reason": reason}]}

    def completion_usage_chunk(self, usage_: dict) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": [], "usage": usage_}


def chat_choice(index: int, message: dict, reason: str | None,
                logprobs: dict | None = None) -> dict:
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}


def completion_choice(index: int, text: str, reason: str | None,
                      logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.id_to_token(token_id)


def chat_logprobs(tokenizer, token_ids, logprobs, top_logprobs) -> dict:
    """OpenAI's chat `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`, one
    entry per token (`top_logprobs` a `{id: logprob}` per token, or None for none)."""
    def entry(token_id, logprob):
        return {"token": _token_text(tokenizer, token_id), "logprob": _floor(logprob),
                "bytes": list(tokenizer.token_bytes(token_id))}

    tops = top_logprobs or [{}] * len(token_ids)
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(k, v) for k, v in top.items()]}
                        for t, lp, top in zip(token_ids, logprobs, tops)]}


def completion_logprobs(tokenizer, token_ids, logprobs, top_logprobs, offset: int = 0) -> dict:
    """OpenAI's completions `logprobs`: `{tokens, token_logprobs, top_logprobs, text_offset}`;
    offsets count characters of the token texts from `offset` (what earlier chunks held)."""
    tokens = [_token_text(tokenizer, t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    tops = [{_token_text(tokenizer, k): _floor(v) for k, v in top.items()}
            for top in top_logprobs] if top_logprobs else [None] * len(tokens)
    return {"tokens": tokens, "token_logprobs": [_floor(lp) for lp in logprobs],
            "top_logprobs": tops, "text_offset": offsets}


def sse(payload: dict | str) -> bytes:
    """One server-sent event; `payload` is a JSON object or the final "[DONE]"."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def model_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "k2jax"}]}
