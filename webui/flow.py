"""The run of a conversation page: apply the pending action, show history, take the next message.

Every page does the same three steps; only how a turn is generated differs (the engine for chat,
the agent loop for tools and the interpreter).

Sidebar buttons call `act` as their callback, which Streamlit runs before the script: New, Clear,
open, delete, undo and import change the conversation there, so the sidebar drawn in the same run
already shows the new state. Retry and Edit need a generation, which only the page can run: they
leave an action that `apply_action` picks up. Clear and delete put the conversation in the store's
trash (hidden everywhere) and offer Undo; the next action, or a new session of this browser after
TRASH_KEEP_S, deletes it for good (with its documents).
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from chatglm_core.messages import ContextTrimmed, Message, Role
from chatglm_core.store import Conversation
from webui import auth, sidebar, state
from webui.bubbles import show_history
from webui.markdown import to_markdown
from webui.turn import stop_generation

UNDO = "undo_offer_{mode}"
TRASH_KEEP_S = 600


def act(mode: str, kind: str, *args: object) -> None:
    """A sidebar button's callback: apply `kind` now, or leave it for the page (retry, edit)."""
    if not auth.may_act():
        return  # the login ended: the gate shows the login page in this run
    stop_generation()  # a click while a reply streams stops it first, its partial reply saved
    if kind in ("regenerate", "edit"):
        st.session_state[f"action_{mode}"] = (kind, *args)
        return
    conv = state.conversation(mode)
    st.session_state.pop(UNDO.format(mode=mode), None)  # an Undo offer lasts until the next action
    if kind == "undo":
        conv = _undo(args[0]) or conv
    state.store().purge(state.client_id())  # and so does what it would have brought back
    if kind == "new":
        conv = Conversation(state.client_id(), mode)
    elif kind == "clear":
        _discard(mode, conv, current=True)
        conv = Conversation(state.client_id(), mode)
    elif kind == "open":
        conv = state.store().get(state.client_id(), str(args[0])) or conv
    elif kind == "delete":
        target = conv if args[0] == conv.id else state.store().get(state.client_id(), str(args[0]))
        if target is not None:
            _discard(mode, target, current=target is conv)
        if args[0] == conv.id:
            conv = Conversation(state.client_id(), mode)
    state.set_conversation(mode, conv)


def _discard(mode: str, conv: Conversation, *, current: bool) -> None:
    state.store().trash(conv.client_id, conv.id)
    conv.discarded = True  # a turn still unwinding must not save it back
    if conv.messages:
        st.session_state[UNDO.format(mode=mode)] = (conv, current)


def _undo(offer: object) -> Conversation | None:
    """Take the conversation out of the trash; it is the current one again if it was."""
    conv, was_current = offer  # type: ignore[misc]
    if not state.store().restore(conv.client_id, conv.id):
        return None  # purged meanwhile (by another tab of this browser)
    conv.discarded = False
    return conv if was_current else None


def apply_action(mode: str) -> tuple[Conversation, bool]:
    """Apply a pending Retry or Edit; returns the current conversation and whether to generate."""
    conv = state.conversation(mode)
    action = st.session_state.pop(f"action_{mode}", None)
    if not action:
        return conv, False
    conv.pending_call_id = None  # a new generation ends a wait for a manual observation
    kind, *args = action
    if kind == "regenerate":
        return conv, truncate_after_last_user(conv)
    if kind == "edit" and truncate_after_last_user(conv) and str(args[0]).strip():
        conv.messages[-1] = Message(Role.USER, str(args[0]))
        state.save(conv)
        return conv, True
    return conv, False


def truncate_after_last_user(conv: Conversation) -> bool:
    """Drop everything after the last user message; False when there is none."""
    for i in range(len(conv.messages) - 1, -1, -1):
        if conv.messages[i].role is Role.USER:
            del conv.messages[i + 1:]
            return True
    return False


def history_and_input(conv: Conversation, mode: str, *, placeholder: str, enabled: bool,
                      busy: bool = False, after: Callable[[int, Message], None] | None = None) -> bool:
    """Show the conversation and the chat box; True when a new user message was just added.

    `busy`: a turn is about to run (no Edit & re-run over a running cell). `after(i, message)` draws
    extra content in a message's bubble (the chat page's citations)."""
    show_history(conv.messages, mode=mode, context=_context_view(conv, mode), editable=not busy, after=after)
    prompt = st.chat_input(placeholder, disabled=not enabled, key=f"input_{mode}")
    if not prompt or not prompt.strip():
        return False
    conv.messages.append(Message(Role.USER, prompt))
    state.save(conv)
    with st.chat_message("user"):
        st.markdown(to_markdown(prompt))
    return True


def _context_view(conv: Conversation, mode: str) -> ContextTrimmed | None:
    """What the model does not see of `conv`: its last turn's view (set by `turn`), else, after a
    refresh or for a reopened conversation, what it would see of the conversation now (its tools'
    descriptions not counted: an estimate a little on the kind side)."""
    views = state.context_views()
    if conv.id not in views and conv.messages and (engine := state.loaded_engine()) is not None:
        try:
            fit = engine.fit(sidebar.system_messages(mode) + conv.messages, sidebar.generation_options(),
                             interpreter=mode == "interpreter")
        except Exception:  # noqa: BLE001 - only a note: one that can't be computed never breaks the page
            return None
        window = engine.backend.context_window or 0
        views[conv.id] = ContextTrimmed(fit.left_out, fit.cut, window) if fit.trimmed else None
    return views.get(conv.id)
