"""The Streamlit app's shared pieces: pages (pages/*) stay thin by calling these.

Nothing here holds model logic: generation goes through `chatglm_core` (engine, agent, sandbox).
"""
