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
calls `stop_generation()` first thing, which sets the in-flight turn's cancel event, marks its
partial reply as stopped and saves it before the page draws the history.

A partial reply is saved however the run ends: by `stop()` (the next run or the Stop button), by
the ``finally`` (when Streamlit raises StopException/RerunException in this thread), and every
SAVE_EVERY_S while it streams, for a run Streamlit abandons (a closed tab) or a process that dies.
Until the reply ends it is saved as "stopped", which is what it is if nothing more arrives.
Each reply's end (stopped, cut by max new tokens) and its tokens and timings go into its
`Message.meta` (see `webui.reply_stats`); timings are taken on the helper thread, when the
events arrive, not when this thread gets round to drawing them.
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
from webui import conv_settings, reply_stats, state
from webui.bubbles import CODE_RAN, OBSERVATION_AVATAR, escape_md, show_call, show_observation
from webui.markdown import to_markdown

POLL_S = 0.25
SAVE_EVERY_S = 1.0
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
        # Save before any st.* call: after a STOP request (fastReruns turns every click and page
        # switch into one) each session-state access raises StopException again, which would
        # skip the rest of this block.
        if not finished:
            live.stop()
        cancel.set()
        live.close(stopped=not finished)
        live.save()
        if not finished and on_stop is not None:
            on_stop()
        if st.session_state.get("inflight") is live:  # a newer run may have started its own turn
            del st.session_state["inflight"]
    if failed:
        return None  # no rerun: it would wipe the error message
    if paused is None:
        st.rerun()  # redraw the sidebar (Retry, the conversation list) for the new history
    return paused


def _pump(events: Callable[[threading.Event], Iterator[Any]], cancel: threading.Event,
          stopped: threading.Event) -> Iterator[tuple[float, Any]]:
    """Yield (arrival time, event) from a helper thread; (now, None) every POLL_S while nothing arrives.

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
                box.put((time.monotonic(), ev))
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
            item = box.get(timeout=POLL_S)
        except queue.Empty:
            yield time.monotonic(), None
            continue
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def stop_generation() -> None:
    """Stop this session's turn in flight, if any: set its cancel event, keep its partial reply."""
    live = st.session_state.get("inflight")
    if live is not None:
        live.stop()
        live.save()  # now: the run that streamed it may never get to its finally


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
        # the generation in progress: when it started, its first text, the pieces received
        self.gen_started, self.first_at, self.last_at, self.pieces = self.started, None, self.started, 0
        self.saved_at = self.started
        # taken now: the saves below must not touch st.session_state (see run_turn's finally)
        self.store = state.store()
        self.settings = conv_settings.snapshot(conv.mode)
        self.max_new_tokens = st.session_state.get("gen_max_new_tokens")
        self.running: ToolCall | None = None  # the call being run (a tool, a code cell), if any
        self.captions: dict[str, Any] = {}  # call id → its "Running code…" caption slot
        self.lock = threading.Lock()  # stop() runs on the next run's thread
        self.noticed = False
        state.set_context_view(conv, None)  # until this turn's generation says otherwise, the model sees it all

    def consume(self, events: Iterator[tuple[float, Any]]) -> NeedObservation | None:
        for t, ev in events:
            if ev is None:
                self.waiting.caption(f":material/hourglass_top: working… {t - self.started:.0f} s")
                continue
            if isinstance(ev, TextDelta):
                if self.partial is None:
                    self.waiting.empty()
                self._text(ev.text, t)
            elif isinstance(ev, Done):
                self._done(ev, t)
            elif isinstance(ev, ContextTrimmed):
                self._context(ev)
            elif isinstance(ev, ToolCallEvent):
                with self.lock:
                    self.running = ev.call
                self.waiting.caption(f":material/hourglass_top: running {escape_md(ev.call.name)}…")
            elif isinstance(ev, ToolResultEvent):
                self._result(ev)
                self.gen_started, self.first_at, self.pieces = t, None, 0  # the next generation starts now
                self.last_at = t
            elif isinstance(ev, NeedObservation):
                self.waiting.empty()
                return ev
        self.waiting.empty()
        return None

    def _assistant_bubble(self) -> Any:
        if self.bubble is None:
            self.bubble = st.chat_message("assistant")
        return self.bubble

    def _text(self, text: str, t: float) -> None:
        if self.stopped.is_set():
            return  # stopped: the partial reply is final
        if self.first_at is None:
            self.first_at = t
        self.pieces, self.last_at = self.pieces + 1, t
        if self.partial is None:
            self.partial = Message(Role.ASSISTANT, "", meta={"finish": "stopped"})  # until it ends otherwise
            self.conv.messages.append(self.partial)
            self.text_slot = self._assistant_bubble().empty()
        self.partial.content += text
        if t - self.saved_at >= SAVE_EVERY_S:
            self._partial_timing()
            self.save()
            self.saved_at = t
        self.text_slot.markdown(to_markdown(self.partial.content) + " ▌")

    def _partial_timing(self) -> None:
        """A partial reply's figures so far: the pieces received stand for its tokens."""
        if self.partial is not None:
            self.partial.meta.update(reply_stats.timing(tokens=self.pieces, started=self.gen_started,
                                                        first=self.first_at, ended=self.last_at), tokens_approx=True)

    def _done(self, ev: Done, t: float) -> None:
        if self.stopped.is_set():
            return  # stop() already settled the partial reply
        message = ev.message
        finish = "stopped" if ev.finish_reason == "cancelled" else ev.finish_reason
        tokens = ev.usage.completion_tokens
        message.meta = {"finish": finish, **reply_stats.timing(tokens=tokens or self.pieces, started=self.gen_started,
                                                               first=self.first_at, ended=t)}
        if not tokens:
            message.meta["tokens_approx"] = True  # a backend that does not count: the pieces received
        if finish == "length":
            message.meta["max_new_tokens"] = self.max_new_tokens
        if self.partial is not None:
            self.conv.messages[self.conv.messages.index(self.partial)] = message
        elif message.content or message.tool_calls or ev.finish_reason == "cancelled":
            self.conv.messages.append(message)
        bubble = self._assistant_bubble()
        if self.text_slot is not None:
            self.text_slot.markdown(to_markdown(message.content))
        elif message.content:
            bubble.markdown(to_markdown(message.content))
        if ev.parse_error:
            bubble.warning(f"The model's tool call could not be read: {ev.parse_error}")
        with bubble:
            for call in message.tool_calls:
                slot = show_call(call, live=True)
                if slot is not None:
                    self.captions[call.id] = slot
        reply_stats.show(message.meta, bubble)
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

    def save(self) -> None:
        """Persist the conversation with the turn's settings; no st.* call, so safe in any thread or unwinding."""
        if self.conv.messages and not self.conv.discarded:
            self.conv.settings = {**self.conv.settings, **self.settings}
            self.store.save(self.conv)

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
            self._partial_timing()

