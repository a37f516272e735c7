"""Chat mode: a plain conversation with the model, streamed; attached documents answer questions."""

import streamlit as st

from webui import attachments, flow, sidebar, state
from webui.turn import run_turn

MODE = "chat"

st.title("Chat")
engine = state.loaded_engine()
conv, generate = flow.apply_action(MODE)
attachments.panel(conv)
generate |= flow.history_and_input(conv, MODE, placeholder="Message the model…", enabled=engine is not None,
                                   after=attachments.citations(conv))

if generate and engine is not None:
    messages = sidebar.system_messages(MODE) + conv.messages
    options = sidebar.generation_options()
    messages, context = attachments.prepare(conv, engine, messages, options.max_new_tokens)
    if context is not None:
        attachments.show_context(context)
    run_turn(conv, lambda cancel: engine.stream(messages, options, cancel=cancel, fit_context=True))
