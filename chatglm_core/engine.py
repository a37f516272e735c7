"""The shared engine: one backend per process, many concurrent callers.

Every caller (a browser session, an API request, the CLI) gets its own event stream. Backends
are not thread-safe, so the engine owns them from one worker thread:

- A local backend that can decode several sequences in lock-step (``open_rows``, see
  `backends.decoding.Rows`) is driven by a batch loop: each step appends one token to every
  running request, and a request that arrives is prefilled and joins the batch at the next step
  (continuous batching, up to `max_batch` rows; later arrivals wait their turn). Its prompt is
  rendered and tokenized before it is queued, in the caller's thread (`_prepare`): a huge prompt
  then costs its own caller the time, never the batch loop and every stream in it. A request that
  finishes, is cancelled or whose caller went away leaves the batch at once; the others go on.
  Each row sees only its own tokens (padding is masked), so its output is its single-stream one.
- Any other backend (remote, scripted) runs one generation at a time under a lock, in arrival
  order.

Setting a caller's cancel event, or closing its generator, ends its generation within a token.

`stream` hands events to the caller's thread through a queue: one thread wake per token per
caller. A server with many streams on one event loop uses `start` with a sink instead: the batch
thread calls the sink with each step's events, and the sink can wake the loop once per step for
all its streams (`api.bridge`), with no thread per request waiting in between.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from chatglm_core.backends.base import Backend, GenerationOptions
from chatglm_core.context import ContextFit, fit_messages, prompt_budget
from chatglm_core.errors import ChatGLMError, GenerationError, RequestError, check_unicode
from chatglm_core.messages import ContextTrimmed, Done, Message, Role, TextDelta, Usage
from chatglm_core.sampling import options_for

log = logging.getLogger(__name__)

#: The last item a sink receives for a generation (after its Done, or after the error that ended it).
END = object()


@dataclass
class _Request:
    messages: list[Message]
    options: GenerationOptions
    tools: list[dict[str, Any]] | None
    interpreter: bool
    cancel: threading.Event
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    decoding: Any = None
    slot: int | None = None
    sink: Callable[[list[Any]], None] | None = None

    def put(self, *events: Any) -> None:
        if self.sink is not None:  # errors as the caller's thread would raise them (see _raise)
            self.sink([_as_error(ev) if isinstance(ev, BaseException) else ev for ev in events])
            return
        for ev in events:
            self.events.put(ev)


class Engine:
    def __init__(self, backend: Backend, *, max_batch: int = 8) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self._lock = threading.Lock()  # one generation at a time, for backends that can't batch
        # one prompt prepared at a time, as when the batch loop prepared them all: a transformers fast
        # tokenizer's special-token splitting is a setting of the shared tokenizer, switched per call, and
        # two threads encoding at once turned a user's "<|im_start|>" into the control token here
        self._prepare_lock = threading.Lock()
        self._batching = callable(getattr(backend, "open_rows", None)) and callable(getattr(backend, "begin", None))
        self._cv = threading.Condition()
        self._pending: list[_Request] = []
        self._active: list[_Request] = []
        self._worker: threading.Thread | None = None
        self._rows: Any = None
        self._closing = False
        _engines.add(self)

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
        fit_context: bool = False,
    ) -> Iterator[TextDelta | Done | ContextTrimmed]:
        """Events of one generation: TextDeltas, then a Done. Raises ChatGLMError subclasses.

        fit_context: leave the oldest turns out (and cut a too-long newest one) when the prompt would
        not fit the context window with room for the reply; a ContextTrimmed event comes first then.
        Without it a prompt that does not fit is a RequestError (context_length_exceeded).
        """
        req, notice = self._request(messages, options, tools, interpreter, cancel, fit_context)
        return self._events(req, notice)

    def start(
        self,
        messages: list[Message],
        options: GenerationOptions | None = None,
        *,
        sink: Callable[[list[Any]], None],
        tools: list[dict[str, Any]] | None = None,
        interpreter: bool = False,
        cancel: threading.Event | None = None,
        fit_context: bool = False,
    ) -> None:
        """Start a generation whose events go to `sink` (lists of TextDelta / ContextTrimmed / Done, an
        exception that ended it, then END), called from the engine's threads: it must be quick and
        thread-safe. The prompt is prepared in this thread, as `stream` does; a request error (bad
        messages, a prompt too long) is raised here."""
        req, notice = self._request(messages, options, tools, interpreter, cancel, fit_context)
        if notice is not None:
            sink([notice])
        req.sink = sink
        self._launch(req)

    def _request(self, messages: list[Message], options: GenerationOptions | None,
                 tools: list[dict[str, Any]] | None, interpreter: bool, cancel: threading.Event | None,
                 fit_context: bool) -> tuple[_Request, ContextTrimmed | None]:
        validate_messages(messages)
        options = options or options_for(self.backend)
        notice = None
        if fit_context:
            fit = self.fit(messages, options, tools=tools, interpreter=interpreter)
            if fit.trimmed:
                messages = fit.messages
                notice = ContextTrimmed(fit.left_out, fit.cut, self.backend.context_window or 0)
        return _Request(messages, options, tools, interpreter, cancel or threading.Event()), notice

    def fit(self, messages: list[Message], options: GenerationOptions | None = None, *,
            tools: list[dict[str, Any]] | None = None, interpreter: bool = False) -> ContextFit:
        """What the model would see of `messages` (see `chatglm_core.context`); as they are when the
        backend does not know its context window (a remote engine)."""
        window = self.backend.context_window
        if not window:
            return ContextFit(list(messages))
        options = options or options_for(self.backend)
        prompt_ids = getattr(self.backend, "prompt_ids", None)  # a local backend: the exact prompt

        def count(ms: list[Message]) -> int:
            with self._prepare_lock:  # the tokenizer is shared with other callers' _prepare
                if prompt_ids is not None:
                    return len(prompt_ids(ms, tools, interpreter))
                return self.backend.count_tokens(ms, tools)

        return fit_messages(messages, count, prompt_budget(window, options.max_new_tokens))

    def _events(self, req: _Request,
                notice: ContextTrimmed | None = None) -> Iterator[TextDelta | Done | ContextTrimmed]:
        if notice is not None:
            yield notice
        self._launch(req)
        finished = False
        try:
            while (ev := req.events.get()) is not END:
                if isinstance(ev, BaseException):
                    _raise(ev)
                yield ev
            finished = True
        finally:
            if not finished:
                req.cancel.set()  # a caller that stopped early (or hit an error) frees its row (or the model)

    def _launch(self, req: _Request) -> None:
        """Queue `req` for the batch loop (its prompt prepared here first), or run it alone on a thread."""
        if self._batching:
            try:
                self._prepare(req)
            except Exception as e:  # a bad request fails alone, with the caller's error
                _raise(e)
            self._submit(req)
        else:
            threading.Thread(target=self._run_alone, args=(req,), name="engine-generate", daemon=True).start()

    def _prepare(self, req: _Request) -> None:
        """The request's decoding state (prompt ids, sampler), made in the caller's thread."""
        if req.cancel.is_set():
            return  # _admit answers it "cancelled"
        with self._prepare_lock:
            req.decoding = self.backend.begin(req.messages, req.options, tools=req.tools,  # type: ignore[attr-defined]
                                              interpreter=req.interpreter)

    def complete(self, messages: list[Message], options: GenerationOptions | None = None, **kw: Any) -> Done:
        """Run one generation to the end and return its Done."""
        done = None
        for ev in self.stream(messages, options, **kw):
            if isinstance(ev, Done):
                done = ev
        assert done is not None, "backend ended without a Done event"
        return done

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel every generation and wait for the batch worker to stop (run at interpreter exit:
        a daemon thread still inside native code while Python finalizes can abort the process)."""
        with self._cv:
            self._closing = True
            worker = self._worker
            for req in self._pending + self._active:
                req.cancel.set()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    def busy(self) -> int:
        """How many generations are running or waiting."""
        with self._cv:
            return len(self._pending) + len(self._active) + (1 if self._lock.locked() else 0)

    # --- one at a time ----------------------------------------------------------------------
    def _run_alone(self, req: _Request) -> None:
        try:
            with self._lock:
                if req.cancel.is_set():
                    req.put(Done(Message(Role.ASSISTANT, ""), "cancelled", Usage()))
                    return
                for ev in self.backend.stream(req.messages, req.options, tools=req.tools,
                                              interpreter=req.interpreter, cancel=req.cancel):
                    req.put(ev)
        except BaseException as e:  # handed to the caller's thread, re-raised there
            req.put(e)
        finally:
            req.put(END)

    # --- the batch loop ---------------------------------------------------------------------
    def _submit(self, req: _Request) -> None:
        with self._cv:
            if self._closing:
                raise GenerationError("the engine is shutting down")
            self._pending.append(req)
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="engine-batch", daemon=True)
                self._worker.start()

    def _loop(self) -> None:
        while True:
            try:
                if self._rows is None:
                    self._rows = self.backend.open_rows(self.max_batch)  # type: ignore[attr-defined]
            except BaseException as e:  # noqa: BLE001 - handed to every waiting caller
                with self._cv:
                    waiting, self._pending = self._pending, []
                for req in waiting:
                    req.put(e, END)
                continue
            with self._cv:
                room = min(self.max_batch, self._rows.capacity) - len(self._active)
                arrivals, self._pending = self._pending[:room], self._pending[room:]
                if not arrivals and not self._active:
                    self._worker = None  # the next _submit starts a fresh worker
                    return
            try:
                for req in arrivals:
                    self._admit(req)
                self._drop_cancelled()
                if self._active:
                    self._step()
            except BaseException as e:  # the model failed: every running request gets the error
                log.exception("batch step failed")
                self._fail_all(e)

    def _admit(self, req: _Request) -> None:
        if req.cancel.is_set() or req.decoding is None:
            req.put(Done(Message(Role.ASSISTANT, ""), "cancelled", Usage()), END)
            return
        try:
            req.slot, logits = self._rows.add(req.decoding.prompt_ids)
        except BaseException as e:  # its prefill failed (e.g. out of memory): the batch goes on without it
            req.put(e, END)
            return
        req.decoding.cached_tokens = self._rows.cached_tokens(req.slot)
        with self._cv:
            self._active.append(req)
        if logits is not None:  # else its (long) prompt is prefilled by the next steps
            self._advance(req, _sample(req, logits))

    def _step(self) -> None:
        # rows that have tokens feed their last one; rows still prefilling get their first logits
        # from the step that finishes their prompt. Each row is sampled inside the step, while its
        # logits are the backend's own (llama.cpp: no copy of them).
        rows = {r.slot: r for r in self._active}
        tokens = self._rows.step({slot: r.decoding.generated[-1] for slot, r in rows.items() if r.decoding.generated},
                                 pick=lambda slot, logits: _sample(rows[slot], logits))
        for req in list(self._active):
            if req.slot in tokens:
                self._advance(req, tokens[req.slot])

    def _advance(self, req: _Request, token: int | BaseException) -> None:
        """Hand the text of this row's sampled token to the caller; retire it when done."""
        dec = req.decoding
        try:
            if isinstance(token, BaseException):
                raise token
            deltas, over = dec.accept(token)
            req.put(*deltas)
            if over:
                self._retire(req, dec.finish())
        except BaseException as e:  # e.g. a constraint processor failing on this request only
            self._retire(req, [e])

    def _drop_cancelled(self) -> None:
        for req in list(self._active):
            if req.cancel.is_set():
                self._retire(req, req.decoding.finish("cancelled"))

    def _retire(self, req: _Request, events: list[Any]) -> None:
        with self._cv:
            if req in self._active:
                self._active.remove(req)
        if req.slot is not None and self._rows is not None:
            self._rows.remove(req.slot)
        req.put(*events, END)

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            failed, self._active = self._active, []
        for req in failed:  # give their sequences / memory back before starting afresh
            try:
                self._rows.remove(req.slot)
            except Exception:  # noqa: BLE001 - the rows' state is unknown after a failure
                log.debug("could not remove a failed row", exc_info=True)
        self._rows = None  # its state is unknown after a failure: start afresh
        for req in failed:
            req.put(error, END)


def _raise(error: BaseException) -> None:
    """Re-raise a failure in the caller's thread as a ChatGLMError."""
    converted = _as_error(error)
    if converted is error:
        raise error
    raise converted from error


def _sample(req: _Request, logits: Any) -> int | BaseException:
    """The row's next token, or what its sampling raised (that request's error alone, not the batch's)."""
    try:
        return req.decoding.sample(logits)
    except BaseException as e:  # noqa: BLE001 - handed to _advance, which retires the request with it
        return e


def _as_error(error: BaseException) -> BaseException:
    """A failure as callers see it: a ChatGLMError (kept as it is) or a GenerationError saying what broke."""
    if isinstance(error, ChatGLMError):
        return error
    if isinstance(error, MemoryError):
        return GenerationError("out of memory while generating: lower max_new_tokens or use a smaller model")
    converted = GenerationError(f"generation failed: {type(error).__name__}: {error}")
    converted.__cause__ = error
    return converted


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for engine in list(_engines):
        engine.shutdown()


def validate_messages(messages: list[Message]) -> None:
    """Reject conversations no prompt format can render; raises RequestError."""
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    for i, m in enumerate(messages):
        check_unicode(m.content, f"messages[{i}].content")
        for j, call in enumerate(m.tool_calls):
            check_unicode(call.arguments, f"messages[{i}].tool_calls[{j}].arguments")
        if m.role is Role.SYSTEM and i != 0:
            raise RequestError(f"messages[{i}]: a system message may only come first", param="messages")
        if m.role is Role.TOOL and (i == 0 or messages[i - 1].role not in (Role.ASSISTANT, Role.TOOL)):
            raise RequestError(f"messages[{i}]: a tool message must follow an assistant message with tool calls",
                               param="messages")
    if messages[-1].role is Role.ASSISTANT and not messages[-1].tool_calls:
        raise RequestError("the last message must be from the user or a tool, not the assistant", param="messages")
