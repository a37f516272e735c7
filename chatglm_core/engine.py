"""The shared engine: one backend per process, many concurrent callers.

Every caller (a browser session, an API request, the CLI) gets its own event stream. The
backend itself is not thread-safe, so each generation runs on a worker thread while holding the
engine's lock: callers queue in arrival order. A caller that stops iterating (closes the
generator, disconnects) or sets its cancel event ends its generation within a token, which
frees the model for the next caller.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from chatglm_core.backends.base import Backend, GenerationOptions
from chatglm_core.errors import ChatGLMError, GenerationError, RequestError
from chatglm_core.messages import Done, Message, Role, TextDelta, Usage

_END = object()


class Engine:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._lock = threading.Lock()

    @property
    def model_name(self) -> str:
        return self.backend.model_name

    def stream(
        self,
        messages: list[Message],
        options: GenerationOptions | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        interpreter: bool = False,
        cancel: threading.Event | None = None,
    ) -> Iterator[TextDelta | Done]:
        """Events of one generation: TextDeltas, then a Done. Raises ChatGLMError subclasses."""
        validate_messages(messages)
        options = options or GenerationOptions()
        cancel = cancel or threading.Event()
        events: queue.Queue[Any] = queue.Queue()

        def work() -> None:
            try:
                with self._lock:
                    if cancel.is_set():
                        events.put(Done(Message(Role.ASSISTANT, ""), "cancelled", Usage()))
                        return
                    for ev in self.backend.stream(messages, options, tools=tools, interpreter=interpreter,
                                                  cancel=cancel):
                        events.put(ev)
            except BaseException as e:  # handed to the caller's thread, re-raised there
                events.put(e)
            finally:
                events.put(_END)

        worker = threading.Thread(target=work, name="engine-generate", daemon=True)
        worker.start()
        finished = False
        try:
            while (ev := events.get()) is not _END:
                if isinstance(ev, ChatGLMError):
                    raise ev
                if isinstance(ev, MemoryError):
                    raise GenerationError("out of memory while generating: lower max_new_tokens or use a smaller model")
                if isinstance(ev, BaseException):
                    raise GenerationError(f"generation failed: {type(ev).__name__}: {ev}") from ev
                yield ev
            finished = True
        finally:
            if not finished:
                cancel.set()  # a caller that stopped early (or hit an error) frees the model

    def complete(self, messages: list[Message], options: GenerationOptions | None = None, **kw: Any) -> Done:
        """Run one generation to the end and return its Done."""
        done = None
        for ev in self.stream(messages, options, **kw):
            if isinstance(ev, Done):
                done = ev
        assert done is not None, "backend ended without a Done event"
        return done


def validate_messages(messages: list[Message]) -> None:
    """Reject conversations no prompt format can render; raises RequestError."""
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    for i, m in enumerate(messages):
        if m.role is Role.SYSTEM and i != 0:
            raise RequestError(f"messages[{i}]: a system message may only come first", param="messages")
        if m.role is Role.TOOL and (i == 0 or messages[i - 1].role not in (Role.ASSISTANT, Role.TOOL)):
            raise RequestError(f"messages[{i}]: a tool message must follow an assistant message with tool calls",
                               param="messages")
    if messages[-1].role is Role.ASSISTANT and not messages[-1].tool_calls:
        raise RequestError("the last message must be from the user or a tool, not the assistant", param="messages")
