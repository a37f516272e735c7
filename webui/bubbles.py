"""Messages and live events as chat bubbles: text, tool calls, code, observations, images.

History and live turns use the same renderers, so a reply looks the same while it streams and
after a rerun. All model text goes through `to_markdown` (HTML shown as text); code and tool
output go through `st.code` (plain text by construction).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import streamlit as st

from chatglm_core.context import notice_text
from chatglm_core.messages import INTERPRETER, ContextTrimmed, Message, Role, ToolCall
from webui import reply_stats
from webui.markdown import to_markdown

OBSERVATION_AVATAR = ":material/terminal:"
CODE_RUNNING = ":material/hourglass_top: Running code…"
CODE_RAN = ":material/code: Ran code"
CODE_NOT_RUN = ":material/code: Code (not run)"
CUT_NOTE = (":material/content_cut: Too long for the model's context window: "
            "the model saw only the start and end of this message.")
#: The line the model reads for each image of an interpreter run (`agent.exec_result_text`); the page
#: shows the images themselves.
IMAGE_LINE = "[Image]"


def show_history(messages: list[Message], *, mode: str, context: ContextTrimmed | None = None,
                 editable: bool = True, after: Callable[[int, Message], None] | None = None) -> None:
    """The conversation as bubbles; `context` marks what the model no longer sees (its last turn's
    view); `editable=False` hides Edit & re-run (while a cell runs); `after(i, message)`, when given,
    draws extra content inside each non-tool message's bubble."""
    last_code = _last_code_call(messages) if mode == "interpreter" and editable else None
    answered = {m.tool_call_id for m in messages if m.role is Role.TOOL}
    left_out = _left_out(messages, context)
    cut = {id(m) for m in context.cut} if context is not None else set()  # the context holds them: ids stay theirs
    for i, m in enumerate(messages):
        if m.role is not Role.SYSTEM:
            _show_message(m, i, last_code, answered, after)
            if id(m) in cut:
                st.caption(CUT_NOTE)
        if left_out and i == left_out[-1]:
            st.info(notice_text(len(left_out), 0, context.context_window)  # type: ignore[union-attr]
                    + " They are the messages above this note.", icon=":material/visibility_off:")


def _show_message(m: Message, i: int, last_code: str | None, answered: set[str | None],
                  after: Callable[[int, Message], None] | None) -> None:
    if m.role is Role.TOOL:
        with st.chat_message("observation", avatar=OBSERVATION_AVATAR):
            show_observation(m)
        return
    with st.chat_message(m.role.value):
        if m.content or not m.tool_calls:
            st.markdown(to_markdown(m.content) or "*(empty reply)*")
        for call in m.tool_calls:
            show_call(call, editable=call.id == last_code, ran=call.id in answered)
        if after is not None:
            after(i, m)
        if m.role is Role.ASSISTANT:
            reply_stats.show(m.meta)  # stopped / cut by max new tokens; tokens and timings


def _left_out(messages: list[Message], context: ContextTrimmed | None) -> list[int]:
    """Indexes of the messages the model no longer saw in its last turn."""
    if context is None:
        return []
    ids = {id(m) for m in context.left_out}
    return [i for i, m in enumerate(messages) if id(m) in ids]


def show_call(call: ToolCall, *, editable: bool = False, live: bool = False, ran: bool = True) -> Any:
    """A tool or code call; for a live code call, returns its caption's slot (to say when it ran)."""
    if call.name == INTERPRETER:
        slot = st.empty()
        slot.caption(CODE_RUNNING if live else CODE_RAN if ran else CODE_NOT_RUN)
        st.code(call.code, language="python")
        if editable:
            _edit_and_rerun(call)
        return slot if live else None
    st.markdown(f"Calling tool **{escape_md(call.name)}**")
    st.code(json.dumps(call.arguments, ensure_ascii=False, indent=2), language="json")
    return None


def show_observation(m: Message) -> None:
    st.caption(f"Observation from **{escape_md(m.name or 'tool')}**")
    text = _without_image_lines(m.content, len(m.images))
    if text:
        st.code(text, language="text", wrap_lines=True)  # long lines wrap instead of scrolling sideways
    for i, png in enumerate(m.images):
        st.image(png, caption=f"figure {i + 1}")


def _without_image_lines(text: str, images: int) -> str:
    """The observation less the trailing "[Image]" lines the model reads in place of the images."""
    lines = text.split("\n")
    while images and lines and lines[-1] == IMAGE_LINE:
        lines.pop()
        images -= 1
    return "\n".join(lines)


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
