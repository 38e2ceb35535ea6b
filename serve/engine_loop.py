"""One engine, one thread: the bridge between asyncio request handlers and the `Engine`.

The engine is not thread-safe, so a single background thread owns it: it takes new requests
and cancellations from a command list, steps the engine while any request has work, and
sleeps on a condition variable when there is none. Each request's output travels back through
its own `asyncio.Queue`, filled from the engine thread with `call_soon_threadsafe`, so handlers
on the event loop only ever await their queue.

What a queue receives, in order: lists of `StreamDelta` (one list per engine step that touched
the request), then either the finished `GenerationResult` or an exception.

Failures are kept as small as the engine allows: a request the engine refuses (ValueError) or
fails on its own (`Engine.pop_failures`) gets its exception and nothing else changes. An
exception from `step()` itself leaves the engine's shared state unknown: every request in
flight gets `EngineFailure`, the loop ends and calls `on_failure`, with which `k2jax serve`
exits non-zero so that a supervisor restarts it instead of a server that answers 503 forever.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable

from serve.engine import Engine, GenerationResult, StreamDelta
from serve.sampling import SamplingParams


class EngineFailure(RuntimeError):
    """The engine raised while stepping; every request in flight gets this."""


class RequestFailure(RuntimeError):
    """The engine failed on one request (the others went on); that request's stream gets it."""


class RequestStream:
    """The handler's side of one engine request: iterate it for delta lists; `result` is set
    when the iteration ends."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.prompt_ids, self.params = prompt_ids, params
        self.engine_id: int | None = None
        self.result: GenerationResult | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def _put(self, item) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def __aiter__(self) -> AsyncIterator[list[StreamDelta]]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, GenerationResult):
                self.result = item
                return
            yield item

    async def wait(self) -> GenerationResult:
        """Consumes the stream; returns the finished result."""
        async for _ in self:
            pass
        return self.result


class EngineLoop:
    """Runs `engine` in a daemon thread; `submit` and `cancel` are called from the event loop.

    Args:
      engine: the `Engine` (or anything with its `add_request`, `step`, `has_unfinished`,
        `is_finished`, `pop_result`, `pop_failures` and `abort`).
      on_failure: called from the engine thread with the exception when `step()` raises,
        after every request in flight has been told.
    """

    def __init__(self, engine: Engine,
                 on_failure: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.on_failure = on_failure
        self.failure: BaseException | None = None
        self._commands: list[tuple[str, RequestStream]] = []
        self._active: dict[int, RequestStream] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30) -> None:
        """Ends the thread after its current step; requests in flight get an error."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self.failure is None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished (read without the engine thread's lock:
        a gauge, not an exact count)."""
        return len(self._active) + len(self._commands)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queues a request; its output arrives on the returned stream."""
        stream = RequestStream(prompt_ids, params)
        self._command("add", stream)
        return stream

    def cancel(self, stream: RequestStream) -> None:
        """Removes the request from the engine (no-op once it has finished)."""
        self._command("cancel", stream)

    def _command(self, kind: str, stream: RequestStream) -> None:
        with self._wake:
            if self.failure is not None or self._stopping:
                raise EngineFailure(f"the engine is not running ({self.failure or 'stopped'})")
            self._commands.append((kind, stream))
            self._wake.notify()

    def _run(self) -> None:
        # An engine spread over several processes is checked while idle too (`heartbeat`), so
        # that a lost host turns /health to 503 without waiting for a request.
        interval = getattr(self.engine, "heartbeat_seconds", None)
        while True:
            with self._wake:
                while not (self._commands or self._stopping or self.engine.has_unfinished()):
                    if not self._wake.wait(interval) and interval is not None:
                        break
                if self._stopping:
                    break
                commands, self._commands = self._commands, []
            if not commands and not self.engine.has_unfinished():
                try:
                    self.engine.heartbeat()
                except Exception as e:  # noqa: BLE001 - a lost host: stop serving
                    self.failure = e
                    break
                continue
            for kind, stream in commands:
                self._apply(kind, stream)
            if self.engine.has_unfinished():
                try:
                    self._step()
                except Exception as e:  # the engine's state is unknown now: stop serving
                    self.failure = e
                    break
        reason = EngineFailure(f"engine stopped: {self.failure!r}" if self.failure
                               else "server shutting down")
        with self._wake:
            pending = [stream for kind, stream in self._commands if kind == "add"]
            self._commands = []
            self._stopping = True
        for stream in [*self._active.values(), *pending]:
            stream._put(reason)
        self._active.clear()
        if self.failure is not None and self.on_failure is not None:
            self.on_failure(self.failure)

    def _apply(self, kind: str, stream: RequestStream) -> None:
        if kind == "add":
            try:
                stream.engine_id = self.engine.add_request(stream.prompt_ids, stream.params)
            except ValueError as e:
                stream._put(e)
                return
            except Exception as e:  # noqa: BLE001 - nothing was added: only this request fails
                stream._put(RequestFailure(f"the engine could not admit this request: {e!r}"))
                return
            self._active[stream.engine_id] = stream
        elif self._active.pop(stream.engine_id, None) is not None:
            self.engine.abort(stream.engine_id)

    def _step(self) -> None:
        by_request: dict[int, list[StreamDelta]] = {}
        for delta in self.engine.step():
            by_request.setdefault(delta.request_id, []).append(delta)
        for request_id, error in self.engine.pop_failures().items():
            stream = self._active.pop(request_id, None)
            if stream is not None:
                stream._put(RequestFailure(f"the engine failed on this request: {error!r}"))
        for request_id, deltas in by_request.items():
            stream = self._active.get(request_id)
            if stream is None:
                continue
            stream._put(deltas)
            if self.engine.is_finished(request_id):
                del self._active[request_id]
                stream._put(self.engine.pop_result(request_id))
