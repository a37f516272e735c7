"""Code Interpreter mode: the model writes Python, this browser's sandboxed kernel runs it."""

import streamlit as st

from chatglm_core.agent import run_agent
from chatglm_core.messages import INTERPRETER, ToolCall, ToolResultEvent
from tools.registry import ToolRegistry
from webui import flow, interpreter_panel, sidebar, state
from webui.turn import run_turn

MODE = "interpreter"

st.title("Code Interpreter")
engine = state.loaded_engine()

interpreter_panel.show()
conv, generate = flow.apply_action(MODE)

# "Edit & re-run" on a code bubble: replace that cell, forget what came after it, run it again
edited: ToolCall | None = None
if (rerun := st.session_state.pop("rerun_code", None)) is not None:
    call_id, code = rerun
    for i, m in enumerate(conv.messages):
        ids = [c.id for c in m.tool_calls]
        if call_id in ids:
            edited = ToolCall(INTERPRETER, {"code": code}, call_id)
            m.tool_calls = m.tool_calls[: ids.index(call_id)] + [edited]
            del conv.messages[i + 1:]
            generate = True
            break

generate |= flow.history_and_input(conv, MODE, placeholder="Ask for something to compute or plot…",
                                   enabled=engine is not None, busy=generate)

if generate and engine is not None and (box := interpreter_panel.sandbox()) is not None:
    messages = sidebar.system_messages(MODE) + conv.messages
    options = sidebar.generation_options()

    def events(cancel):
        history = list(messages)
        if edited is not None:
            for ev in interpreter_panel.run_code_events(box, edited, engine.backend):
                if isinstance(ev, ToolResultEvent):
                    history.append(ev.message)
                yield ev
        if not cancel.is_set():
            # no tools here, only the interpreter: an empty registry
            yield from run_agent(engine, history, registry=ToolRegistry(), options=options, sandbox=box,
                                 max_rounds=state.settings().max_tool_rounds, cancel=cancel, fit_context=True)

    run_turn(conv, events, on_stop=box.interrupt)
