"""The OpenAI-compatible HTTP server: `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
`/health`, on one continuous-batching engine.

    engine = Engine(config, params, detokenize=chat.detokenizer(tokenizer))
    loop = EngineLoop(engine).start()
    app = OpenAIServer(loop, tokenizer, model_name="k2", limits=ServerLimits(...)).app()
    uvicorn.run(app, host="127.0.0.1", port=8000)

Each handler validates its request (`serve.openai_protocol`), submits token ids to the
`EngineLoop` and reads the deltas back. Chat prompts are rendered with K2 Thinking's template
(`serve.chat`) and outputs parsed by `OutputParser` into reasoning, `content` and `tool_calls`;
reasoning goes out as both `reasoning` (vLLM's current name) and `reasoning_content` (DeepSeek's,
and vLLM's earlier one) unless `reasoning_fields` picks one. Assistant messages in requests may
carry either name; `reasoning` wins when both are set. Text completions encode text as ordinary tokens (never control tokens) or take
token ids. Streams are OpenAI chunks over server-sent events ending in `data: [DONE]`; a client
that disconnects, streaming or not, has its request removed from the engine at once.
Errors are OpenAI's error JSON, whatever the route: 400 for a bad request (naming the field),
401 for a missing or wrong API key, 404 for an unknown model or route, 405 for a wrong method,
413 for a prompt or body over the limits, 500 when the engine failed on that one request (the
others go on), 503 once the engine itself has failed.

Hostile input: the body is read up to `max_body_bytes` and no further; parsing cannot raise
anything but a 400 (`openai_protocol.parse_request`); every numeric field is bounded there to
what the engine's int32/float32 arrays and the model can hold; a prompt that cannot fit is
refused from its length in characters before it is tokenized (a token spans at most
`max_token_bytes` characters), and parsing and tokenizing run in a worker thread, so a large
request never stalls the event loop that serves everyone else.

Request options (anything else is a 400 naming it, but for `proto.IGNORED_FIELDS`: accepted,
ignored, named in one logged warning per request):
  both endpoints  model, max_tokens, temperature [0, 2], top_p, n [1, 16], stop, seed,
                  presence_penalty, frequency_penalty, stream, stream_options.include_usage,
                  logit_bias {"id": [-100, 100]} (<= 300); vLLM's top_k, min_p,
                  repetition_penalty, stop_token_ids
  chat            messages, tools, tool_choice ("auto", "none", "required", {"type":
                  "function", "function": {"name"}}), parallel_tool_calls,
                  max_completion_tokens, logprobs, top_logprobs [0, 20], response_format
                  ({"type": "text" | "json_object"}), chat_template_kwargs ({"thinking":
                  bool, "preserve_thinking": bool}),
                  heavy {"n": 2..16} (`serve.heavy`)
  completions     prompt: text, token ids, or a list of either; echo (false only);
                  logprobs [0, 5]
Chat logprobs cover every generated token (reasoning and tool-call section too, as vLLM);
`tool_choice` other than "auto", `parallel_tool_calls: false` and `response_format:
json_object` (llguidance; no tool calls then) constrain decoding (`serve.constraints`).
`finish_reason` is "length" when cut by max_tokens or the context (reasoning counts against
max_tokens), "tool_calls" when the message calls tools, else "stop". Usage counts the prompt
and every generated token, the stop token included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import socket
import threading
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serve import chat, constraints, heavy, openai_protocol as proto
from serve.chat_stream import ChatChoices, FinalRequest, run_to_end
from serve.engine_loop import EngineFailure, EngineLoop, RequestFailure
from serve.http_streams import EventStream, merge_streams, unless_disconnected
from serve.openai_protocol import ProtocolError
from serve.parsers import REASONING_FIELDS


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for.

    max_seq_len: the engine's context (prompt + output).
    max_prompt_tokens: longest prompt (413 beyond); less than `max_seq_len`.
    max_tokens: most output tokens per completion; chat's default `max_tokens` (capped by
      the room the prompt leaves).
    max_body_bytes: largest request body (413 beyond).
    """

    max_seq_len: int
    max_prompt_tokens: int
    max_tokens: int
    max_body_bytes: int = 32 * 2**20

    def __post_init__(self):
        if not 1 <= self.max_prompt_tokens < self.max_seq_len:
            raise ValueError(f"max_prompt_tokens must be in [1, {self.max_seq_len - 1}] (the "
                             f"context is {self.max_seq_len}), got {self.max_prompt_tokens}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


def _error_response(request: Request, error: ProtocolError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status)


def _rejected_by_engine(request: Request, error: ValueError) -> JSONResponse:
    # The engine validates what it is given (prompt ids, sampling values) with ValueError.
    return JSONResponse(ProtocolError(400, str(error)).to_json(), status_code=400)


def _engine_failure(request: Request, error: EngineFailure) -> JSONResponse:
    body = ProtocolError(503, str(error), kind="server_error").to_json()
    return JSONResponse(body, status_code=503)


def _request_failure(request: Request, error: RequestFailure) -> JSONResponse:
    body = ProtocolError(500, str(error), kind="server_error").to_json()
    return JSONResponse(body, status_code=500)


def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    # Starlette's own 404 (no such route) and 405 (wrong method), in OpenAI's shape.
    message = {404: f"no route {request.url.path!r}",
               405: f"{request.method} is not allowed on {request.url.path!r}"}.get(
                   error.status_code, error.detail)
    return JSONResponse(ProtocolError(error.status_code, message).to_json(),
                        status_code=error.status_code, headers=error.headers)


def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logging.getLogger(__name__).exception("unhandled error in %s", request.url.path)
    body = ProtocolError(500, f"internal error: {type(error).__name__}",
                         kind="server_error").to_json()
    return JSONResponse(body, status_code=500)


def _error_event(error: Exception) -> bytes:
    if not isinstance(error, ProtocolError):
        error = ProtocolError(500, str(error), kind="server_error")
    return proto.sse(error.to_json())


class OpenAIServer:
    """The endpoints, over an `EngineLoop` whose engine decodes with `chat.detokenizer`.

    Args:
      loop: the running `EngineLoop`.
      tokenizer: the model's `K2Tokenizer`.
      model_name: the id `/v1/models` lists and requests must name.
      limits: `ServerLimits`.
      api_key: when set, every `/v1` request needs `Authorization: Bearer <api_key>`.
      reasoning_fields: the names reasoning goes out under, in messages and stream deltas
        (default both `reasoning` and `reasoning_content`).
    """

    def __init__(self, loop: EngineLoop, tokenizer, *, model_name: str, limits: ServerLimits,
                 api_key: str | None = None, reasoning_fields=REASONING_FIELDS):
        self.loop, self.tokenizer, self.model_name = loop, tokenizer, model_name
        self.limits, self.api_key = limits, api_key
        if not reasoning_fields or not set(reasoning_fields) <= set(REASONING_FIELDS):
            raise ValueError(f"reasoning_fields: a non-empty subset of {REASONING_FIELDS}, got "
                             f"{reasoning_fields!r}")
        self.reasoning_fields = tuple(reasoning_fields)
        self.vocab_size = loop.engine.config.vocab_size
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        handlers = {ProtocolError: _error_response, EngineFailure: _engine_failure,
                    RequestFailure: _request_failure, ValueError: _rejected_by_engine,
                    HTTPException: _http_error, Exception: _internal_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # ---- endpoints --------------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        if not self.loop.healthy:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "in_flight": self.loop.in_flight})

    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(proto.model_list(self.model_name, self.created))

    async def chat_completions(self, request: Request):
        self._authorize(request)
        req, prompt, reserved, constraint = await asyncio.to_thread(self._parse_chat,
                                                                    await self._body(request))
        max_new = self._max_new_tokens(req, len(prompt.token_ids), reserved,
                                       req.heavy.n + 1 if req.heavy else 1)
        params = proto.sampling_params(req, max_new, stop_token_ids=self.tokenizer.stop_ids,
                                       vocab_size=self.vocab_size, constraint=constraint)
        header = proto.ResponseHeader("chatcmpl", self.model_name)
        final = FinalRequest(prompt.text, prompt.token_ids, params)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(self._chat_events(header, req, final, include_usage))
        return await unless_disconnected(request, self._chat_response(header, req, final))

    async def completions(self, request: Request):
        self._authorize(request)
        req, prompts = await asyncio.to_thread(self._parse_completion, await self._body(request))
        max_new = min(self._max_new_tokens(req, len(p)) for p in prompts)
        params = proto.sampling_params(req, max_new, vocab_size=self.vocab_size)
        header = proto.ResponseHeader("cmpl", self.model_name)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStream(self._completion_events(header, prompts, params, include_usage))
        return await unless_disconnected(request,
                                         self._completion_response(header, prompts, params))

    # ---- parsing (in a worker thread) -------------------------------------------------------
    def _parse_chat(self, body: bytes):
        """`(request, prompt, reserved, constraint)`: `reserved` more prompt tokens heavy mode
        needs, `constraint` the `SamplingParams.constraint` of its tool choice (or None)."""
        req = proto.parse_request(body, proto.ChatCompletionRequest)
        self._check_model(req.model)
        self._warn_ignored(req)
        self._check_stop_ids(req)
        tool_choice = self._check_chat_options(req)
        self._check_text_fits(_message_chars(req.messages))
        prompt = self._render(req.messages, req.tools, _template_flags(req))
        self._check_prompt(len(prompt.token_ids))
        reserved = 0
        if req.heavy is not None:
            # The aggregation prompt holds the conversation, every candidate and instructions.
            empty = [{"content": None}] * req.heavy.n
            reserved = len(self._render(heavy.aggregation_messages(req.messages, empty),
                                        req.tools, _template_flags(req)).token_ids) - len(
                                            prompt.token_ids)
        earlier_calls = sum(len(m.get("tool_calls") or ()) for m in req.messages
                            if m.get("role") == "assistant")
        if _wants_json(req):
            constraint = constraints.JsonObject(self.tokenizer,
                                                constraints.prompt_starts(prompt.text))
        else:
            constraint = constraints.for_tool_choice(self.tokenizer, tool_choice, req.tools,
                                                     req.parallel_tool_calls, prompt.text,
                                                     earlier_calls)
        return req, prompt, reserved, constraint

    def _check_chat_options(self, req) -> str | None:
        """Checks the options that depend on each other; returns the tool choice as "auto",
        "none", "required", a function name, or None."""
        if req.top_logprobs is not None and not req.logprobs:
            raise ProtocolError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
        choice = req.tool_choice
        if _wants_json(req) and (choice == "required" or isinstance(choice,
                                                                     proto.NamedToolChoice)):
            raise ProtocolError(400, "response_format: a json_object answer cannot also be a "
                                "required tool call", "response_format")
        if isinstance(choice, proto.NamedToolChoice):
            choice = choice.function.name
            names = [t.get("function", {}).get("name") for t in req.tools or ()
                     if isinstance(t, dict) and isinstance(t.get("function"), dict)]
            if choice not in names:
                raise ProtocolError(400, f"tool_choice: names function {choice[:80]!r}, which "
                                    "is not among the request's tools", "tool_choice")
        elif choice == "required" and not req.tools:
            raise ProtocolError(400, "tool_choice: 'required' needs tools", "tool_choice")
        return choice

    def _warn_ignored(self, req) -> None:
        ignored = proto.ignored_fields(req)
        if ignored:
            logging.getLogger(__name__).warning(
                "ignoring request parameters this server does not implement: %s",
                ", ".join(ignored))

    def _parse_completion(self, body: bytes):
        req = proto.parse_request(body, proto.CompletionRequest)
        self._check_model(req.model)
        self._warn_ignored(req)
        self._check_stop_ids(req)
        prompts = self._completion_prompts(req.prompt)
        for prompt in prompts:
            self._check_prompt(len(prompt))
        return req, prompts

    # ---- chat -------------------------------------------------------------------------------
    async def _prepare(self, req, final: FinalRequest) -> FinalRequest:
        """The request whose output answers: `final` itself, or in heavy mode the
        aggregation request, after generating the candidates."""
        if req.heavy is None:
            return final
        params = dataclasses.replace(final.params, n=req.heavy.n)
        choices = ChatChoices(req.heavy.n, final.prompt_text,
                              reasoning_fields=self.reasoning_fields)
        candidates_stream = self.loop.submit(final.prompt_ids, params)
        await run_to_end(self.loop, candidates_stream, choices.feed_all)
        candidates = [choice["message"] for choice in choices.choices()]
        prompt = self._render(heavy.aggregation_messages(req.messages, candidates), req.tools,
                              _template_flags(req))
        room = self.limits.max_seq_len - len(prompt.token_ids)
        if room < 1:
            raise ProtocolError(400, f"heavy: the aggregation prompt has {len(prompt.token_ids)}"
                                f" tokens, the context {self.limits.max_seq_len}; lower "
                                "max_tokens or heavy.n", "heavy")
        params = dataclasses.replace(final.params,
                                     max_new_tokens=min(final.params.max_new_tokens, room))
        return FinalRequest(prompt.text, prompt.token_ids, params,
                            len(final.prompt_ids), choices.completion_tokens, candidates)

    async def _chat_response(self, header, req, final: FinalRequest) -> JSONResponse:
        final = await self._prepare(req, final)
        choices = ChatChoices(req.n, final.prompt_text, self.tokenizer, req.logprobs,
                              self.reasoning_fields)
        await run_to_end(self.loop, self.loop.submit(final.prompt_ids, final.params),
                         choices.feed_all)
        extra = {"heavy": {"candidates": final.candidates}} if final.candidates else {}
        usage = final.usage(choices.completion_tokens)
        return JSONResponse(header.chat_completion(choices.choices(), usage, **extra))

    async def _chat_events(self, header, req, final: FinalRequest, include_usage: bool):
        try:
            for index in range(req.n):
                yield proto.sse(header.chat_chunk(index, {"role": "assistant", "content": ""}))
            final = await self._prepare(req, final)
            choices = ChatChoices(req.n, final.prompt_text, self.tokenizer, req.logprobs,
                              self.reasoning_fields)
            stream = self.loop.submit(final.prompt_ids, final.params)
            try:
                async for deltas in stream:
                    for delta in deltas:
                        for index, openai_delta, reason, logprobs in choices.feed(delta):
                            yield proto.sse(header.chat_chunk(index, openai_delta, reason,
                                                              logprobs))
            finally:
                if stream.result is None:
                    self.loop.cancel(stream)
            if include_usage:
                yield proto.sse(header.chat_usage_chunk(final.usage(choices.completion_tokens)))
        except (ProtocolError, EngineFailure, RequestFailure, ValueError) as e:
            yield _error_event(e)
        yield proto.sse("[DONE]")

    # ---- text completions -------------------------------------------------------------------
    async def _completion_response(self, header, prompts, params) -> JSONResponse:
        streams = [self.loop.submit(p, params) for p in prompts]
        choices, completion_tokens = [], 0
        try:
            for p, stream in enumerate(streams):
                for c in (await run_to_end(self.loop, stream)).outputs:
                    completion_tokens += len(c.token_ids)
                    logprobs = None
                    if params.logprobs is not None and c.logprobs is not None:
                        logprobs = proto.completion_logprobs(self.tokenizer, c.token_ids,
                                                             c.logprobs, c.top_logprobs)
                    choices.append(proto.completion_choice(p * params.n + c.index, c.text or "",
                                                           c.finish_reason, logprobs))
        finally:
            for stream in streams:
                if stream.result is None:
                    self.loop.cancel(stream)
        usage = proto.usage(sum(map(len, prompts)), completion_tokens)
        return JSONResponse(header.completion(choices, usage))

    async def _completion_events(self, header, prompts, params, include_usage: bool):
        streams = [self.loop.submit(p, params) for p in prompts]
        completion_tokens, offsets = 0, {}
        try:
            async for p, deltas in merge_streams(streams):
                for delta in deltas:
                    completion_tokens += len(delta.token_ids)
                    index = p * params.n + delta.index
                    logprobs = None
                    if delta.logprobs is not None and delta.token_ids:
                        logprobs = proto.completion_logprobs(
                            self.tokenizer, delta.token_ids, delta.logprobs,
                            delta.top_logprobs, offsets.get(index, 0))
                        offsets[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                    if delta.text or delta.finish_reason or logprobs:
                        yield proto.sse(header.completion_chunk(
                            index, delta.text or "", delta.finish_reason, logprobs))
            if include_usage:
                usage = proto.usage(sum(map(len, prompts)), completion_tokens)
                yield proto.sse(header.completion_usage_chunk(usage))
        except (EngineFailure, RequestFailure, ValueError) as e:
            yield _error_event(e)
        finally:
            for stream in streams:
                if stream.result is None:
                    self.loop.cancel(stream)
        yield proto.sse("[DONE]")

    # ---- checks -----------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(),
                                                                 self.api_key.encode()):
            raise ProtocolError(401, "missing or invalid API key (Authorization: Bearer ...)",
                                code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        """The body, read no further than the limit (a chunked body declares no length)."""
        limit = self.limits.max_body_bytes
        too_large = ProtocolError(413, f"request body over {limit} bytes", code="body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ProtocolError(404, f"model {model!r} does not exist; this server serves "
                                f"{self.model_name!r}", "model", "model_not_found")

    def _render(self, messages, tools, flags: dict):
        try:
            return chat.render(self.tokenizer, messages, tools, **flags)
        except (ValueError, KeyError, TypeError) as e:
            raise ProtocolError(400, str(e).strip("'\""), "messages") from None

    def _check_stop_ids(self, req) -> None:
        for token_id in req.stop_token_ids or ():
            if token_id >= self.vocab_size:
                raise ProtocolError(400, f"stop_token_ids: token ids must be in "
                                    f"[0, {self.vocab_size})", "stop_token_ids")

    def _check_text_fits(self, chars: int) -> None:
        """Refuses text that no tokenization could fit in the prompt limit, untokenized."""
        fewest_tokens = -(-chars // self.tokenizer.max_token_bytes)
        if fewest_tokens > self.limits.max_prompt_tokens:
            raise ProtocolError(413, f"the prompt has at least {fewest_tokens} tokens, more "
                                f"than this server's limit of {self.limits.max_prompt_tokens}",
                                code="prompt_too_long")

    def _check_prompt(self, prompt_tokens: int) -> None:
        if prompt_tokens == 0:
            raise ProtocolError(400, "the prompt is empty", "prompt")
        if prompt_tokens > self.limits.max_prompt_tokens:
            raise ProtocolError(413, f"the prompt has {prompt_tokens} tokens, more than this "
                                f"server's limit of {self.limits.max_prompt_tokens}",
                                code="prompt_too_long")

    def _completion_prompts(self, prompt) -> list[list[int]]:
        """A text completion's prompts as token ids: text, ids, or a list of either."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ProtocolError(400, "prompt: no prompts given", "prompt")
        for p in prompt:
            if isinstance(p, str):
                self._check_text_fits(len(p))
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in prompt]
        for i, p in enumerate(ids):
            if any(not 0 <= t < self.vocab_size for t in p):
                raise ProtocolError(400, f"prompt[{i}]: token ids must be in "
                                    f"[0, {self.vocab_size})", "prompt")
        return ids

    def _max_new_tokens(self, req, prompt_tokens: int, reserved: int = 0,
                        outputs: int = 1) -> int:
        """The request's output budget per completion. The context must hold the prompt,
        `reserved` more tokens and `outputs` outputs of that many tokens (heavy mode: every
        candidate, then the answer)."""
        room = (self.limits.max_seq_len - prompt_tokens - reserved) // outputs
        requested = proto.requested_max_tokens(req)
        if requested is None or not {"max_tokens", "max_completion_tokens"} & req.model_fields_set:
            # Unset (or completions' default of 16): as much as the limits and context allow.
            requested = min(requested or self.limits.max_tokens, self.limits.max_tokens, room)
        elif requested > self.limits.max_tokens:
            raise ProtocolError(400, f"max_tokens: at most {self.limits.max_tokens} on this "
                                f"server, got {requested}", "max_tokens")
        if requested < 1 or requested > room:
            held = f"{prompt_tokens} prompt tokens" + (f" + {reserved} for heavy mode's "
                                                        "aggregation" if reserved else "")
            per = f" in each of {outputs} passes" if outputs > 1 else ""
            raise ProtocolError(400, f"the context holds {self.limits.max_seq_len} tokens: "
                                f"{held} leave room for {max(room, 0)} output tokens{per}, "
                                f"{requested} requested", "max_tokens", "context_length_exceeded")
        return requested


def _wants_json(req) -> bool:
    return req.response_format is not None and req.response_format.type == "json_object"


def _template_flags(req) -> dict:
    """The renderer's `thinking` and `preserve_thinking` from `chat_template_kwargs`."""
    kwargs = req.chat_template_kwargs or proto.ChatTemplateKwargs()
    return {"thinking": kwargs.thinking, "preserve_thinking": kwargs.preserve_thinking}


def _message_chars(messages) -> int:
    """Characters of the messages' `content` text, which the template renders verbatim."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(part["text"]) for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return chars


class BackgroundServer:
    """Serves an ASGI app with uvicorn in a thread, on a free port unless one is given:
    `with BackgroundServer(app) as server: server.url` (tests, benchmarks, notebooks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self._socket = socket.create_server((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited before it started")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._socket.close()
