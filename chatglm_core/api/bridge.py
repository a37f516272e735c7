"""Running one engine generation without blocking the event loop.

`Engine.stream` is a blocking iterator. `EngineRun` iterates it on a worker thread and hands each
event to the event loop through an asyncio queue, so the server keeps answering other requests
while a generation runs (or waits its turn for the model). Closing the run sets the engine's
cancel event: the generation ends within a token, or never starts if it was still queued.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from starlette.requests import Request

from chatglm_core.backends.base import GenerationOptions
from chatglm_core.engine import Engine
from chatglm_core.messages import Done, Message, TextDelta

_END = object()


class ClientGone(Exception):
    """The HTTP client disconnected while we waited for the model."""


class EngineRun:
    def __init__(self, engine: Engine, messages: list[Message], options: GenerationOptions,
                 tools: list[dict[str, Any]] | None) -> None:
        self.cancel = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._pending: asyncio.Future[Any] | None = None
        self._ended = False
        args = (engine, messages, options, tools)
        threading.Thread(target=self._work, args=args, name="api-generate", daemon=True).start()

    def _work(self, engine: Engine, messages: list[Message], options: GenerationOptions,
              tools: list[dict[str, Any]] | None) -> None:
        try:
            for ev in engine.stream(messages, options, tools=tools, cancel=self.cancel):
                self._put(ev)
        except BaseException as e:  # noqa: BLE001  (re-raised on the event loop by next())
            self._put(e)
        finally:
            self._put(_END)

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
            self.cancel.set()

    async def next(self, request: Request | None = None, poll: float = 0.25) -> TextDelta | Done | None:
        """The next event, or None at the end. Raises what the generation raised.

        With `request`, polls for a client disconnect while waiting and raises ClientGone (only
        before the response has started: afterwards Starlette watches the connection itself).
        """
        if self._ended:
            return None
        if request is None and self._pending is None:
            # the streaming loop's call, once per token: a plain await (a task and asyncio.wait per
            # event cost the event loop ~20% of its per-token work, which the model's thread waited for)
            return self._unwrap(await self._queue.get())
        while True:
            if self._pending is None:
                self._pending = asyncio.ensure_future(self._queue.get())
            done, _ = await asyncio.wait({self._pending}, timeout=poll if request is not None else None)
            if done:
                item = self._pending.result()
                self._pending = None
                break
            if request is not None and await request.is_disconnected():
                self.close()
                raise ClientGone()
        return self._unwrap(item)

    def _unwrap(self, item: Any) -> TextDelta | Done | None:
        if item is _END:
            self._ended = True
            return None
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    def close(self) -> None:
        """Stop the generation (a no-op once it has ended)."""
        self.cancel.set()
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
