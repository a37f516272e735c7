"""Running one engine generation without blocking the event loop.

`EngineRun` starts a generation with `Engine.start`: its prompt is prepared in the loop's default
executor (tokenizing a long conversation must not hold up other requests), and the engine's batch
thread hands each step's events to a `LoopSink`, which wakes the event loop once per step for
every stream on it (before, a thread per request iterated `Engine.stream`, and each of them woke
per token beside the model's threads). Closing the run sets the engine's cancel event: the
generation ends within a token, or never starts if it was still queued.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from typing import Any

from starlette.requests import Request

from chatglm_core.backends.base import GenerationOptions
from chatglm_core.engine import END, Engine
from chatglm_core.messages import Done, Message, TextDelta


class ClientGone(Exception):
    """The HTTP client disconnected while we waited for the model."""


class Inbox:
    """One generation's events on the event loop: a deque and the one waiter of `get` (lighter than an
    asyncio.Queue, whose put and get ran a dozen Python calls per streamed token)."""

    __slots__ = ("items", "_waiter")

    def __init__(self) -> None:
        self.items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def deliver(self, events: list[Any]) -> None:
        """Add events (on the loop's thread) and wake the waiting `get`."""
        self.items.extend(events)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.items.popleft()


class LoopSink:
    """Events from the engine's threads into inboxes on one loop, one loop wake per batch of calls
    (the calls of one batch step arrive together)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[Inbox, list[Any]]] = []
        self._scheduled = False

    def put(self, inbox: Inbox, events: list[Any]) -> bool:
        """Queue `events` for `inbox`; False when the loop is gone (nobody is listening)."""
        with self._lock:
            self._items.append((inbox, events))
            if self._scheduled:
                return True
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is closed (server shutting down)
            return False
        return True

    def _flush(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for inbox, events in items:
            inbox.deliver(events)


_sinks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopSink] = weakref.WeakKeyDictionary()


def loop_sink(loop: asyncio.AbstractEventLoop) -> LoopSink:
    sink = _sinks.get(loop)
    if sink is None:
        sink = _sinks[loop] = LoopSink(loop)
    return sink


class EngineRun:
    def __init__(self, engine: Engine, messages: list[Message], options: GenerationOptions,
                 tools: list[dict[str, Any]] | None) -> None:
        self.cancel = threading.Event()
        loop = asyncio.get_running_loop()
        self._sink = loop_sink(loop)
        self._inbox = Inbox()
        self._pending: asyncio.Future[Any] | None = None
        self._ended = False
        self._starting = loop.run_in_executor(None, self._start, engine, messages, options, tools)

    def _start(self, engine: Engine, messages: list[Message], options: GenerationOptions,
               tools: list[dict[str, Any]] | None) -> None:
        try:
            engine.start(messages, options, tools=tools, cancel=self.cancel, sink=self._put)
        except BaseException as e:  # noqa: BLE001  (re-raised on the event loop by next())
            self._put([e, END])

    def _put(self, events: list[Any]) -> None:
        if not self._sink.put(self._inbox, events):
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
            return self._unwrap(await self._inbox.get())
        while True:
            if self._pending is None:
                self._pending = asyncio.ensure_future(self._inbox.get())
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
        if item is END:
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
