"""Messages and live events as chat bubbles: text, tool calls, code, observations, images.

History and live turns use the same renderers, so a reply looks the same while it streams and
after a rerun. All model text goes through `to_markdown` (HTML shown as text); code and tool
output go through `st.code` (plain text by construction).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import streamlit as st

from chatglm_core.messages import INTERPRETER, Message, Role, ToolCall
from webui import reply_stats
from webui.markdown import to_markdown

OBSERVATION_AVATAR = ":material/terminal:"


def show_history(messages: list[Message], *, mode: str,
                 after: Callable[[int, Message], None] | None = None) -> None:
    """`after(i, message)`, when given, draws extra content inside each non-tool message's bubble."""
    last_code = _last_code_call(messages) if mode == "interpreter" else None
    for i, m in enumerate(messages):
        if m.role is Role.SYSTEM:
            continue
        if m.role is Role.TOOL:
            with st.chat_message("observation", avatar=OBSERVATION_AVATAR):
                show_observation(m)
            continue
        with st.chat_message(m.role.value):
            if m.content or not m.tool_calls:
                st.markdown(to_markdown(m.content) or "*(empty reply)*")
            for call in m.tool_calls:
                show_call(call, editable=call.id == last_code)
            if after is not None:
                after(i, m)
            if m.role is Role.ASSISTANT:
                reply_stats.show(m.meta)


def show_call(call: ToolCall, *, editable: bool = False) -> None:
    if call.name == INTERPRETER:
        st.caption("Running code")
        st.code(call.code, language="python")
        if editable:
            _edit_and_rerun(call)
        return
    st.markdown(f"Calling tool **{escape_md(call.name)}**")
    st.code(json.dumps(call.arguments, ensure_ascii=False, indent=2), language="json")


def show_observation(m: Message) -> None:
    st.caption(f"Observation from **{escape_md(m.name or 'tool')}**")
    if m.content:
        st.code(m.content, language="text")
    for i, png in enumerate(m.images):
        st.image(png, caption=f"figure {i + 1}")


def _edit_and_rerun(call: ToolCall) -> None:
    with st.popover("Edit & re-run", icon=":material/edit:"):
        code = st.text_area("Code", call.code, height=200, key=f"edit_{call.id}")
        if st.button("Run this code", key=f"rerun_{call.id}", type="primary"):
            st.session_state["rerun_code"] = (call.id, code)
            st.rerun()


def _last_code_call(messages: list[Message]) -> str | None:
    for m in reversed(messages):
        for c in reversed(m.tool_calls):
            if c.name == INTERPRETER:
                return c.id
    return None


def escape_md(text: str) -> str:
    """A name shown inside Markdown: no markup, no HTML."""
    return "".join("\\" + ch if ch in "\\`*_{}[]()#+-.!|<>~$" else ch for ch in text)
