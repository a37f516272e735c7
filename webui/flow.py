"""The run of a conversation page: apply the pending action, show history, take the next message.

Every page does the same three steps; only how a turn is generated differs (the engine for chat,
the agent loop for tools and the interpreter).
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from chatglm_core.messages import ContextTrimmed, Message, Role
from chatglm_core.store import Conversation
from webui import sidebar, state
from webui.bubbles import show_history
from webui.markdown import to_markdown


def apply_action(mode: str) -> tuple[Conversation, bool]:
    """Apply the sidebar's pending action; returns the current conversation and whether to generate."""
    conv = state.conversation(mode)
    action = st.session_state.pop(f"action_{mode}", None)
    if not action:
        return conv, False
    st.session_state.pop(f"pending_{mode}", None)  # any action ends a wait for a manual observation
    kind, *args = action
    if kind in ("new", "clear"):
        if kind == "clear":
            state.store().delete(conv.client_id, conv.id)
        conv = Conversation(state.client_id(), mode)
    elif kind == "open":
        conv = state.store().get(state.client_id(), args[0]) or conv
    elif kind == "delete":
        state.store().delete(state.client_id(), args[0])
        if args[0] == conv.id:
            conv = Conversation(state.client_id(), mode)
    elif kind == "regenerate":
        return conv, truncate_after_last_user(conv)
    elif kind == "edit":
        if truncate_after_last_user(conv) and args[0].strip():
            conv.messages[-1] = Message(Role.USER, args[0])
            state.save(conv)
            return conv, True
        return conv, False
    state.set_conversation(mode, conv)
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
