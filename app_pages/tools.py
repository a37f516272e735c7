"""Tool mode: the model calls the session's tools; calls and observations show as their own bubbles."""

import streamlit as st

from chatglm_core.agent import run_agent
from chatglm_core.messages import Message, NeedObservation, Role
from webui import flow, sidebar, state, tools_panel
from webui.bubbles import OBSERVATION_AVATAR, escape_md, show_observation
from webui.turn import run_turn

MODE = "tools"

st.title("Tool")
engine = state.loaded_engine()

setup = tools_panel.show()
conv, generate = flow.apply_action(MODE)
pending = conv.pending_call()  # saved with the conversation: a refresh still waits for it
generate |= flow.history_and_input(conv, MODE, placeholder="Ask something a tool can answer…",
                                   enabled=engine is not None and pending is None)

if pending is not None and not generate:
    slot = st.empty()
    with slot.container(), st.chat_message("observation", avatar=OBSERVATION_AVATAR):
        st.markdown(f"The model called **{escape_md(pending.name)}**: type what the tool returns.")
        with st.form("observation_form", clear_on_submit=True):
            text = st.text_area("Observation", key="observation_text")
            submitted = st.form_submit_button("Send observation", type="primary")
    if submitted:
        slot.empty()
        observation = Message(Role.TOOL, text, tool_call_id=pending.id, name=pending.name)
        conv.messages.append(observation)
        conv.pending_call_id = None
        state.save(conv)
        with st.chat_message("observation", avatar=OBSERVATION_AVATAR):
            show_observation(observation)
        generate = True

if generate and engine is not None:
    registry = tools_panel.manual_registry(setup.registry) if setup.manual else setup.registry
    messages = sidebar.system_messages(MODE) + conv.messages
    options = sidebar.generation_options()
    paused = run_turn(conv, lambda cancel: run_agent(
        engine, messages, registry=registry, options=options, tool_choice=setup.agent_tool_choice, sandbox=None,
        max_rounds=state.settings().max_tool_rounds, cancel=cancel, fit_context=True))
    if isinstance(paused, NeedObservation):
        conv.pending_call_id = paused.call.id
        state.save(conv)
        st.rerun()
