"""HTTP plumbing for long requests: server-sent events, and noticing when a client leaves.

A generation can run for minutes, so the server must notice a client that disconnects and stop
generating for it. `EventStream` sends an async iterator of SSE bytes while it listens for the
ASGI `http.disconnect` message; on disconnect it cancels the iteration, so the generator's
`finally` blocks run right away (they cancel the engine request). `unless_disconnected` does
the same for a non-streaming handler.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone (the request body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """A `text/event-stream` response from an async iterator of encoded events."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]):
        # No `super().__init__`: it would declare a Content-Length for an empty body.
        self.status_code, self.background, self.events = 200, None, events
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        try:
            async with anyio.create_task_group() as group:
                async def watch() -> None:
                    await _disconnected(receive)
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                try:
                    async for event in self.events:
                        await send({"type": "http.response.body", "body": event,
                                    "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:  # the connection broke while sending
                    pass
                group.cancel_scope.cancel()
        finally:
            await self.events.aclose()


async def unless_disconnected(request: Request, work: Awaitable) -> Response:
    """Awaits `work` (a response), cancelling it if the client disconnects first; the answer
    to a client that has gone is a bodiless 499 ("client closed request"), sent to no one."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)
    return task.result()


async def merge_streams(streams) -> AsyncIterator[tuple[int, object]]:
    """Items of several async iterators as they come: `(iterator index, item)`.

    An iterator's exception is raised here; when the consumer stops, the remaining
    iterators are cancelled.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index, stream):
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, done))
        except Exception as e:
            await queue.put((index, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
