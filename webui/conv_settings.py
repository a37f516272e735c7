"""A conversation's generation settings and system prompt, between the sidebar and the store.

The sidebar's widgets hold the values (``gen_*``, ``system_{mode}``); every save copies them into
the conversation (`snapshot`), and whenever a page shows a different conversation than the one
whose settings the widgets hold (a refresh, open, import, a page switch), its saved values are put
back into the widgets before they are drawn (`restore_for`). A new conversation keeps the current
values.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from chatglm_core.store import Conversation

#: store setting -> sidebar widget key ("system" is per mode: see `_key`)
WIDGETS = {"temperature": "gen_temperature", "top_p": "gen_top_p", "repetition_penalty": "gen_repetition_penalty",
           "max_new_tokens": "gen_max_new_tokens"}
_APPLIED = "settings_applied_{mode}"


def _key(setting: str, mode: str) -> str:
    return f"system_{mode}" if setting == "system" else WIDGETS[setting]


def snapshot(mode: str) -> dict[str, Any]:
    """The session's current values (only those its sidebar has set up)."""
    ss = st.session_state
    return {name: ss[_key(name, mode)] for name in (*WIDGETS, "system") if _key(name, mode) in ss}


def restore_for(mode: str, conv: Conversation) -> None:
    """Put `conv`'s saved settings into the widgets, once per conversation shown (before the widgets exist)."""
    marker = _APPLIED.format(mode=mode)
    if st.session_state.get(marker) == conv.id:
        return
    st.session_state[marker] = conv.id
    for name, value in conv.settings.items():
        if name == "system" or name in WIDGETS:
            st.session_state[_key(name, mode)] = value
