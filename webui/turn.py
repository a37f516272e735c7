"""One live turn: stream engine/agent events into bubbles, with a Stop that really stops.

How stopping works with Streamlit's reruns: any click (the Stop button, a new message, a sidebar
widget) while the script streams makes Streamlit raise a rerun exception inside the script at its
next element update. The ``finally`` below then sets the generation's cancel event (the engine
stops within a token and frees the model for other sessions) and saves the partial reply, which
is already in the conversation because it grows there as it streams.

Events are pulled on a helper thread and handed over through a queue, so the script updates a
"waiting" line a few times a second even while no token arrives (queued behind another
session, prompt processing, a tool or kernel running): Streamlit only notices a click when the
script touches an element, and this keeps a Stop prompt in every phase.

With ``runner.fastReruns`` (Streamlit's default) the new run starts at once on a fresh thread
while the old one is still unwinding, so the new run must not wait for that ``finally``: main.py
calls `stop_generation()` first thing, which sets the in-flight turn's cancel event and marks its
partial reply as stopped before the page draws the history.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import streamlit as st

from chatglm_core.context import notice_text
from chatglm_core.errors import ChatGLMError
from chatglm_core.messages import (
    INTERPRETER,
    ContextTrimmed,
    Done,
    Message,
    NeedObservation,
    Role,
    TextDelta,
    ToolCall,
    ToolCallEvent,
    ToolResultEvent,
)
from chatglm_core.store import Conversation
from webui import state
from webui.bubbles import CODE_RAN, OBSERVATION_AVATAR, escape_md, show_call, show_observation
from webui.markdown import to_markdown

POLL_S = 0.25
_END = object()
INTERRUPTED = "Interrupted: the user stopped {what} before it finished, so it produced no result."


def run_turn(conv: Conversation, events: Callable[[threading.Event], Iterator[Any]], *,
             on_stop: Callable[[], None] | None = None) -> NeedObservation | None:
    """Render `events(cancel)` live, then rerun the page; returns the NeedObservation of a paused turn.

    `cancel` is set when the user stops the turn; the events generator is also closed then.
    """
    cancel = threading.Event()
    live = _LiveTurn(conv, cancel)
    st.session_state["inflight"] = live
    stop_slot = st.empty()
    stop_slot.button("Stop", key="stop", icon=":material/stop_circle:", on_click=stop_generation)
    finished = failed = False
    try:
        paused = live.consume(_pump(events, cancel, live.stopped))
        finished = True
    except ChatGLMError as e:
        finished = failed = True
        stop_slot.empty()  # nothing left to stop
        st.error(f"Generation failed: {e}")
    finally:
        if not finished:
            live.stop()
            if on_stop is not None:
                on_stop()
        cancel.set()
        if st.session_state.get("inflight") is live:  # a newer run may have started its own turn
            del st.session_state["inflight"]
        live.close(stopped=not finished)
        state.save(conv)
    if failed:
        return None  # no rerun: it would wipe the error message
    if paused is None:
        st.rerun()  # redraw the sidebar (Retry, the conversation list) for the new history
    return paused


def _pump(events: Callable[[threading.Event], Iterator[Any]], cancel: threading.Event,
          stopped: threading.Event) -> Iterator[Any]:
    """Yield events from a helper thread; yields None every POLL_S while nothing arrives.

    Once `stopped` is set the helper closes the events generator at its next event (within a
    token), which ends an agent loop and, through it, the engine's generation.
    """
    box: queue.Queue[Any] = queue.Queue()

    def work() -> None:
        gen = events(cancel)
        try:
            for ev in gen:
                if stopped.is_set():
                    break
                box.put(ev)
        except BaseException as e:  # re-raised on the script thread
            box.put(e)
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()
            box.put(_END)

    threading.Thread(target=work, name="webui-turn", daemon=True).start()
    while True:
        try:
            ev = box.get(timeout=POLL_S)
        except queue.Empty:
            yield None
            continue
        if ev is _END:
            return
        if isinstance(ev, BaseException):
            raise ev
        yield ev


def stop_generation() -> None:
    """Stop this session's turn in flight, if any: set its cancel event, keep its partial reply."""
    live = st.session_state.get("inflight")
    if live is not None:
        live.stop()


class _LiveTurn:
    def __init__(self, conv: Conversation, cancel: threading.Event) -> None:
        self.conv = conv
        self.cancel = cancel  # handed to the engine or agent; set on Stop
        self.stopped = threading.Event()  # the user's: set only by stop()
        self.partial: Message | None = None  # the assistant message growing right now
        self.text_slot: Any = None
        self.bubble: Any = None
        self.waiting = st.empty()
        self.started = time.monotonic()
        self.running: ToolCall | None = None  # the call being run (a tool, a code cell), if any
        self.captions: dict[str, Any] = {}  # call id → its "Running code…" caption slot
        self.lock = threading.Lock()  # stop() runs on the next run's thread
        self.noticed = False
        state.set_context_view(conv, None)  # until this turn's generation says otherwise, the model sees it all

    def consume(self, events: Iterator[Any]) -> NeedObservation | None:
        for ev in events:
            if ev is None:
                self.waiting.caption(f":material/hourglass_top: working… {time.monotonic() - self.started:.0f} s")
                continue
            if isinstance(ev, TextDelta):
                if self.partial is None:
                    self.waiting.empty()
                self._text(ev.text)
            elif isinstance(ev, Done):
                self._done(ev)
            elif isinstance(ev, ContextTrimmed):
                self._context(ev)
            elif isinstance(ev, ToolCallEvent):
                with self.lock:
                    self.running = ev.call
                self.waiting.caption(f":material/hourglass_top: running {escape_md(ev.call.name)}…")
            elif isinstance(ev, ToolResultEvent):
                self._result(ev)
            elif isinstance(ev, NeedObservation):
                self.waiting.empty()
                return ev
        self.waiting.empty()
        return None

    def _assistant_bubble(self) -> Any:
        if self.bubble is None:
            self.bubble = st.chat_message("assistant")
        return self.bubble

    def _text(self, text: str) -> None:
        if self.stopped.is_set():
            return  # stopped: the partial reply is final
        if self.partial is None:
            self.partial = Message(Role.ASSISTANT, "")
            self.conv.messages.append(self.partial)
            self.text_slot = self._assistant_bubble().empty()
        self.partial.content += text
        self.text_slot.markdown(to_markdown(self.partial.content) + " ▌")

    def _done(self, ev: Done) -> None:
        if self.stopped.is_set():
            return  # stop() already settled the partial reply
        message = ev.message
        if self.partial is not None:
            self.conv.messages[self.conv.messages.index(self.partial)] = message
        elif message.content or message.tool_calls or ev.finish_reason == "cancelled":
            self.conv.messages.append(message)
        bubble = self._assistant_bubble()
        if self.text_slot is not None:
            self.text_slot.markdown(to_markdown(message.content))
        elif message.content:
            bubble.markdown(to_markdown(message.content))
        if ev.finish_reason == "cancelled":
            state.mark_stopped(message)
            bubble.caption(":material/stop_circle: stopped — the partial reply is kept")
        if ev.parse_error:
            bubble.warning(f"The model's tool call could not be read: {ev.parse_error}")
        with bubble:
            for call in message.tool_calls:
                slot = show_call(call, live=True)
                if slot is not None:
                    self.captions[call.id] = slot
        # the next round (after a tool result) opens a new bubble
        self.partial, self.text_slot, self.bubble = None, None, None

    def _context(self, ev: ContextTrimmed) -> None:
        """Some of the conversation no longer fits: remember what (the history marks it), say so now."""
        state.set_context_view(self.conv, ev)
        if not self.noticed:
            self.noticed = True
            st.info(notice_text(len(ev.left_out), len(ev.cut), ev.context_window), icon=":material/visibility_off:")

    def _result(self, ev: ToolResultEvent) -> None:
        self.waiting.empty()
        with self.lock:
            if self.stopped.is_set():
                return  # stop() already answered the call
            self.running = None
            self.conv.messages.append(ev.message)
        if (slot := self.captions.pop(ev.call.id, None)) is not None:
            slot.caption(CODE_RAN)
        with st.chat_message("observation", avatar=OBSERVATION_AVATAR):
            show_observation(ev.message)
            if not ev.ok:
                st.caption("the tool reported an error; the model sees it as the result")

    def stop(self) -> None:
        """Called from the next run (or the Stop button's callback): no element updates here."""
        with self.lock:
            self.stopped.set()
            self.cancel.set()
            self._answer_interrupted()
        self.close(stopped=True)

    def _answer_interrupted(self) -> None:
        """A call stopped while it ran gets an observation saying so, so the model and the user both
        read what happened (its output, if any, is lost with the interrupted run)."""
        call, self.running = self.running, None
        if call is None:
            return
        what = "this code cell" if call.name == INTERPRETER else f"the call of {call.name}"
        self.conv.messages.append(Message(Role.TOOL, INTERRUPTED.format(what=what), tool_call_id=call.id,
                                          name=call.name))

    def close(self, *, stopped: bool) -> None:
        """Bookkeeping only (no element updates: this may run while Streamlit unwinds a rerun)."""
        partial = self.partial
        if partial is None:
            return
        if not partial.content.strip():
            self.conv.messages[:] = [m for m in self.conv.messages if m is not partial]
        elif stopped:
            partial.content = partial.content.rstrip()
            state.mark_stopped(partial)

