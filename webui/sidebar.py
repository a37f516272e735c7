"""The shared sidebar: model, generation controls, system prompt, conversation actions and history.

Buttons call `webui.flow.act` as their callback: New, Clear, open, delete and undo take effect
before the script runs, so this sidebar already shows their result; Retry and Edit leave an action
the page applies (it runs the generation). Every change goes through that one place.
"""

from __future__ import annotations

import time
from typing import Any

import streamlit as st

from chatglm_core.backends.base import GenerationOptions
from chatglm_core.chat import options_from
from chatglm_core.engine import Engine
from chatglm_core.errors import RequestError
from chatglm_core.messages import Message, Role
from chatglm_core.store import Conversation, conversation_from_json, conversation_to_json, conversation_to_markdown
from webui import auth, conv_settings, flow, reply_stats, state
from webui.bubbles import escape_md
from webui.turn import stop_generation

SEARCH_KEY = "conv_search_{mode}"


def show(mode: str, engine: Engine | None) -> None:
    with st.sidebar:
        if engine is not None:
            runtime = getattr(engine.backend, "runtime", None)
            st.caption(f"Model **{engine.model_name}** on **{getattr(engine.backend, 'device', '?')}**"
                       + (f" ({runtime})" if runtime else ""))
        else:
            st.caption("Model not loaded")
        if not st.session_state.get("trash_purged"):  # once a session: what an Undo offer left behind
            st.session_state["trash_purged"] = True
            state.store().purge(state.client_id(), older_than_s=flow.TRASH_KEEP_S)
        conv = state.conversation(mode)
        conv_settings.restore_for(mode, conv)  # its settings into the widgets, before they are drawn
        _generation_controls(mode, engine)
        _conversation_actions(mode, conv)
        _undo_offer(mode)
        _history(mode, conv)
        _export_import(mode, conv)


def _generation_controls(mode: str, engine: Engine | None) -> None:
    # Defaults: the settings' values you set (CHATGLM_TEMPERATURE, …), else the model's own
    # recommendation (chatglm_core.sampling: the embedded SmolLM2's card says temperature 0.2,
    # top_p 0.9), else temperature 0.7, top_p 0.9, repetition penalty 1.05, 512 new tokens.
    # ChatGLM3's demo uses 0.95 / 0.8 / 1.1 / 256, tuned for a 6B model: small local models
    # (135M–3B) drift into nonsense at 0.95, a 1.1 penalty makes them avoid the repeated punctuation
    # code and JSON tool calls need, and 256 tokens cut most code answers short.
    s = state.settings()
    d = options_from(s, engine.backend if engine is not None else None)
    defaults = {"gen_temperature": d.temperature, "gen_top_p": d.top_p,
                "gen_repetition_penalty": d.repetition_penalty, "gen_max_new_tokens": d.max_new_tokens}
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)
    sampling = getattr(engine.backend, "sampling", None) if engine is not None else None
    where = f"Default: {sampling.describe()}." if sampling is not None else None
    with st.expander("Generation", expanded=False):
        st.slider("Temperature (0 = greedy)", 0.0, 2.0, step=0.05, key="gen_temperature", help=where)
        st.slider("Top p", 0.05, 1.0, step=0.05, key="gen_top_p", help=where)
        st.slider("Repetition penalty", 1.0, 2.0, step=0.01, key="gen_repetition_penalty")
        st.number_input("Max new tokens", 1, 32768, step=64, key="gen_max_new_tokens")
        key = f"system_{mode}"
        # the interpreter's default system prompt comes from the prompt format; an empty box keeps it
        st.session_state.setdefault(key, "" if mode == "interpreter" else s.system_prompt)
        st.text_area("System prompt", key=key, height=100,
                     help="Sent before the conversation. Leave empty for the mode's default.")
        st.toggle("Show reply stats", key=reply_stats.SHOW_KEY, value=True,
                  help="Tokens, time to first token and tokens/s under each reply")


def generation_options() -> GenerationOptions:
    ss = st.session_state
    return options_from(state.settings(), getattr(state.loaded_engine(), "backend", None),
                        temperature=float(ss["gen_temperature"]), top_p=float(ss["gen_top_p"]),
                        repetition_penalty=float(ss["gen_repetition_penalty"]),
                        max_new_tokens=int(ss["gen_max_new_tokens"]))


def system_messages(mode: str) -> list[Message]:
    text = st.session_state.get(f"system_{mode}", "").strip()
    return [Message(Role.SYSTEM, text)] if text else []


def _conversation_actions(mode: str, conv: Conversation) -> None:
    def act(*action: Any) -> None:
        flow.act(mode, *action)

    has_user = any(m.role is Role.USER for m in conv.messages)
    c1, c2, c3 = st.columns(3)
    c1.button("New", key="new_conv", on_click=act, args=("new",), help="Start a new conversation", width="stretch")
    c2.button("Clear", key="clear_conv", on_click=act, args=("clear",), help="Clear this conversation",
              disabled=not conv.messages, width="stretch")
    c3.button("Retry", key="regenerate", on_click=act, args=("regenerate",), help="Regenerate the last reply",
              disabled=not has_user, width="stretch")
    last_user = next((m.content for m in reversed(conv.messages) if m.role is Role.USER), None)
    if last_user is not None:
        with st.expander("Edit last message"):
            key = f"edit_last_{conv.id}_{len(conv.messages)}"
            st.text_area("Your last message", last_user, key=key)
            # read the box in the callback: a value captured now would miss the edit that came with the click
            st.button("Save & regenerate", key="edit_regenerate",
                      on_click=lambda: act("edit", st.session_state.get(key, last_user)))


def _undo_offer(mode: str) -> None:
    offer = st.session_state.get(flow.UNDO.format(mode=mode))
    if offer is None:
        return
    c1, c2 = st.columns([3, 1], vertical_alignment="center")
    c1.caption(f"Deleted “{escape_md(offer[0].title or offer[0].default_title() or '(untitled)')}”")
    c2.button("Undo", key=f"undo_{mode}", icon=":material/undo:", on_click=flow.act, args=(mode, "undo", offer))


def _history(mode: str, current: Conversation) -> None:
    store, cid = state.store(), state.client_id()
    past = store.list(cid, mode, limit=30)
    if not past and not st.session_state.get(SEARCH_KEY.format(mode=mode)):
        return
    st.subheader("Conversations", divider="gray")
    query = st.text_input("Search conversations", key=SEARCH_KEY.format(mode=mode),
                          placeholder="Search titles and messages", label_visibility="collapsed",
                          icon=":material/search:")
    if query.strip():
        past = store.search(cid, query, mode=mode)
        if not past:
            st.caption("No conversation matches.")
    for conv in past:
        c1, c2 = st.columns([5, 1])
        # a title is the user's text: escaped, so button-label markdown (links, images) stays text
        label = ("▶ " if conv.id == current.id else "") + escape_md(conv.title or "(untitled)")
        c1.button(label, key=f"open_{conv.id}", help=time.strftime("%Y-%m-%d %H:%M", time.localtime(conv.updated_at)),
                  on_click=flow.act, args=(mode, "open", conv.id), width="stretch")
        c2.button("", key=f"del_{conv.id}", icon=":material/delete:", help="Delete (you can undo)",
                  on_click=flow.act, args=(mode, "delete", conv.id))


def _export_import(mode: str, conv: Conversation) -> None:
    with st.expander("Export / import"):
        name = f"{mode}-{conv.id[:8]}"
        st.download_button("Download JSON", conversation_to_json(conv), f"{name}.json", "application/json",
                           disabled=not conv.messages, key="export_json", on_click="ignore")
        st.download_button("Download Markdown", conversation_to_markdown(conv), f"{name}.md", "text/markdown",
                           disabled=not conv.messages, key="export_md", on_click="ignore")
        st.file_uploader("Import a JSON conversation", type=["json"], key=f"import_{mode}",
                         on_change=_import, args=(mode,))
        if error := st.session_state.pop("import_error", None):
            st.error(error)


def _import(mode: str) -> None:
    upload = st.session_state.get(f"import_{mode}")
    if upload is None or not auth.may_act():
        return
    try:
        conv = conversation_from_json(upload.getvalue(), client_id=state.client_id(), mode=mode)
    except RequestError as e:
        st.session_state["import_error"] = f"Could not import {upload.name}: {e}"
        return
    stop_generation()
    state.store().save(conv)  # as imported: its own settings and system prompt, not the sidebar's
    state.set_conversation(mode, conv)
