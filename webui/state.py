"""Per-browser state: the stable client id, the shared engine and store, each mode's conversation.

A browser keeps its id in the URL (``?cid=…``), so a refresh, or a server restart, finds the same
conversations in the store. Each mode (chat, tools, interpreter) has its own current
conversation in ``st.session_state``; every finished (or stopped) turn is saved, with the
generation settings and system prompt it was held with, and how each reply ended.
"""

from __future__ import annotations

import gc
import re
import uuid

import streamlit as st

from chatglm_core.engine import Engine
from chatglm_core.messages import ContextTrimmed, Message
from chatglm_core.settings import Settings, load_settings
from chatglm_core.store import Conversation, ConversationStore

MODES = {"chat": "Chat", "tools": "Tool", "interpreter": "Code Interpreter"}
_CID = re.compile(r"^[0-9a-f]{32}$")


# --- process-wide resources -------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def settings() -> Settings:
    return load_settings()


def build_engine(s: Settings) -> Engine:
    """Load the model named by the settings (tests replace this with a scripted backend)."""
    from chatglm_core.backends import load_backend

    return Engine(load_backend(s))


@st.cache_resource(show_spinner=False)
def _engine_or_error() -> tuple[Engine | None, str | None]:
    # The error is cached too: a failing load would otherwise be retried (slowly) on every rerun.
    # "Retry loading" in the page clears this cache.
    try:
        eng = build_engine(settings())
    except Exception as e:  # shown on the page; the app itself stays up
        return None, f"{type(e).__name__}: {e}"
    # What is loaded by now (Streamlit, torch, the model's Python side: ~255k objects) lives as long as the
    # server. Out of the cyclic collector's sight, a full collection no longer walks it (116 ms -> ~0 here):
    # a pause that would otherwise land on some session's streaming tokens (as in the API server). Garbage is
    # collected first, so that none of it (a model loaded before a "Retry loading") is kept for good.
    gc.collect()
    gc.freeze()
    return eng, None


def engine() -> Engine | None:
    """The one engine of this process; on a load error shows it with what to do, returns None."""
    with st.spinner("Loading the model (once per server)…"):
        eng, error = _engine_or_error()
    if error:
        st.error(f"**The model failed to load.** {error}\n\n"
                 "Check `MODEL_PATH` (an HF model folder or a .gguf file; unset for the embedded SmolLM2), "
                 "`CHATGLM_DEVICE` and free memory, then press *Retry loading*.")
        if st.button("Retry loading", key="retry_engine"):
            _engine_or_error.clear()
            st.rerun()
    return eng


def loaded_engine() -> Engine | None:
    """The engine main.py loaded this run (None after a load error); draws nothing."""
    return _engine_or_error()[0]


@st.cache_resource(show_spinner=False)
def store() -> ConversationStore:
    return ConversationStore.from_settings(settings())


# --- this browser -------------------------------------------------------------------------------
def client_id() -> str:
    """The browser's id: from this session, else the URL, else new; always written back to the URL.

    Logged in (webui/auth.py), it is the account's id instead ("user:NAME", never a URL's hex id), so
    conversations and the code interpreter's kernel belong to the account."""
    owner = st.session_state.get("auth_owner")
    if owner:
        return owner
    cid = st.session_state.get("client_id")
    if not cid:
        from_url = st.query_params.get("cid", "")
        cid = from_url if _CID.match(from_url) else uuid.uuid4().hex
        st.session_state["client_id"] = cid
    if st.query_params.get("cid") != cid:  # page switches drop query params: put it back
        st.query_params["cid"] = cid
    return cid


def conversation(mode: str) -> Conversation:
    """This session's current conversation in `mode` (the newest stored one after a refresh)."""
    key = f"conv_{mode}"
    if key not in st.session_state:
        past = store().list(client_id(), mode, limit=1)
        st.session_state[key] = past[0] if past else Conversation(client_id(), mode)
    return st.session_state[key]


def set_conversation(mode: str, conv: Conversation) -> None:
    st.session_state[f"conv_{mode}"] = conv
    st.session_state.pop(f"pending_{mode}", None)


def save(conv: Conversation) -> None:
    """Persist a conversation that has something in it (not one the user deleted meanwhile)."""
    if conv.messages and not conv.discarded:
        from webui import conv_settings

        conv.settings = {**conv.settings, **conv_settings.snapshot(conv.mode)}
        store().save(conv)


def mark_stopped(message: Message) -> None:
    """The reply was cut (Stop, a click, a page switch): saved with it, shown under it."""
    message.meta["finish"] = "stopped"


def context_views() -> dict[str, ContextTrimmed | None]:
    """conversation id → what the model did not see of it in its last turn (session-only)."""
    return st.session_state.setdefault("context_view", {})


def set_context_view(conv: Conversation, notice: ContextTrimmed | None) -> None:
    context_views()[conv.id] = notice
