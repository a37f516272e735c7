"""The Streamlit app: `streamlit run main.py`. Chat, tool calling and a code interpreter on one model.

This script runs on every interaction of every browser session. It loads the engine once per
process (st.cache_resource), draws the shared sidebar and hands over to the page picked in the
navigation. Pages live in app_pages/ (not pages/: a folder of that name switches Streamlit to
its older automatic multipage mode, which bypasses this script on reruns); what they share
lives in webui/.
"""

import streamlit as st

from webui import auth, sidebar, state
from webui.turn import stop_generation

st.set_page_config(page_title="ChatGLM Workbench", page_icon=":material/forum:", layout="centered")
# Before anything else: refuses to serve a network address without logins, and shows nothing but the
# login form until this session has logged in (when there are accounts).
auth.gate()

# Any interaction reruns the script: whatever this session was generating stops here, its partial
# reply kept (the interrupted run may still be unwinding on its own thread; see webui/turn.py).
stop_generation()
state.client_id()

PAGES = {
    "chat": st.Page("app_pages/chat.py", title="Chat", icon=":material/chat:", default=True),
    "tools": st.Page("app_pages/tools.py", title="Tool", icon=":material/build:"),
    "interpreter": st.Page("app_pages/code_interpreter.py", title="Code Interpreter", icon=":material/terminal:"),
}
page = st.navigation(list(PAGES.values()))
mode = next(m for m, p in PAGES.items() if p.url_path == page.url_path)
st.session_state["mode"] = mode

engine = state.engine()  # spinner on first load; a load error is shown here and the app stays up
sidebar.show(mode, engine)
page.run()
