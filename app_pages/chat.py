"""Chat mode: a plain conversation with the model, streamed."""

import streamlit as st

from webui import flow, sidebar, state
from webui.turn import run_turn

MODE = "chat"

st.title("Chat")
engine = state.loaded_engine()
conv, generate = flow.apply_action(MODE)
generate |= flow.history_and_input(conv, MODE, placeholder="Message the model…", enabled=engine is not None)

if generate and engine is not None:
    messages = sidebar.system_messages(MODE) + conv.messages
    options = sidebar.generation_options()
    run_turn(conv, lambda cancel: engine.stream(messages, options, cancel=cancel, fit_context=True))
