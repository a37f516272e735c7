"""The Tool page's sidebar: this session's tools, their schemas, enable/disable, tool choice, YAML.

Each browser session works on its own copy of the server's registry (built once from the
built-ins, custom_tools.yaml and CHATGLM_TOOLS), so enabling, disabling or uploading tools in
one session changes nothing for the others.

Uploaded or edited YAML comes from a browser, not from whoever configured the server: it may
define manual and HTTP tools and HTTP (``url:``) MCP servers, but ``python:`` tools and ``command:``
MCP servers (which run code on the server) are refused unless the server enabled the shell tool,
which already grants that power. MCP servers a session's YAML starts are this session's: they stop
when the YAML is replaced or the session's registry is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import streamlit as st

from chatglm_core.errors import ConfigError
from webui import state
from webui.bubbles import escape_md

SESSION_SOURCE = "yaml editor (this session)"
SHELL_TOOLS = {"shell"}


@dataclass
class ToolSetup:
    registry: Any  # tools.ToolRegistry
    tool_choice: str  # "auto", "required", "none" or a tool name
    manual: bool  # the user types every observation

    @property
    def agent_tool_choice(self) -> str | dict[str, str]:
        """run_agent's form: the three keywords as they are, a tool name as {"name": ...}."""
        return self.tool_choice if self.tool_choice in ("auto", "required", "none") else {"name": self.tool_choice}


@st.cache_resource(show_spinner=False)
def base_registry() -> Any:
    from tools import build_registry

    return build_registry(state.settings())


def session_registry() -> Any:
    if "tool_registry" not in st.session_state:
        st.session_state["tool_registry"] = base_registry().copy()
    return st.session_state["tool_registry"]


def show() -> ToolSetup:
    registry = session_registry()
    with st.sidebar:
        st.subheader("Tools", divider="gray")
        for err in registry.load_errors:
            st.error(f"A tools file was skipped: {err}")
        for warning in registry.warnings:
            st.warning(warning, icon=":material/warning:")
        for tool in registry.tools(include_disabled=True):
            _tool_row(registry, tool)
        names = registry.names()
        choice = st.selectbox("Tool choice", ["auto", "required", "none", *names], key="tool_choice",
                              help="auto: the model decides; required: it must call a tool; a name: that tool")
        manual = st.toggle("Manual mode", key="tool_manual",
                           help="Don't run tools: you type each observation the model gets back")
        _yaml_editor(registry)
    return ToolSetup(registry, choice, manual)


def _tool_row(registry: Any, tool: Any) -> None:
    key = f"tool_on_{tool.name}"
    st.session_state.setdefault(key, registry.is_enabled(tool.name))
    enabled = st.checkbox(tool.name, key=key, help=tool.description)
    if enabled != registry.is_enabled(tool.name):
        registry.set_enabled(tool.name, enabled)
    if tool.name in SHELL_TOOLS and enabled:
        st.warning("**shell** runs whatever command the model writes, on this server, as the app's user.",
                   icon=":material/warning:")
    with st.expander(f"{tool.name} schema" + (" · manual" if tool.manual else "")):
        st.caption(tool.description)
        st.json(tool.parameters, expanded=True)
        st.caption(f"from {tool.source or 'unknown'}")


def _yaml_editor(registry: Any) -> None:
    with st.expander("Tools YAML (this session)"):
        upload = st.file_uploader("Upload a tools YAML file", type=["yaml", "yml"], key="tools_upload")
        if upload is not None and st.session_state.get("tools_upload_id") != upload.file_id:
            st.session_state["tools_upload_id"] = upload.file_id
            st.session_state["tools_yaml"] = upload.getvalue().decode("utf-8", errors="replace")
            st.session_state["tools_upload_unloaded"] = upload.name
        if name := st.session_state.get("tools_upload_unloaded"):  # filling the editor loads nothing yet
            st.info(f"{escape_md(name)} is in the editor below: press **Load / reload** to use its tools.",
                    icon=":material/info:")
        st.text_area("YAML", key="tools_yaml", height=220, placeholder="tools:\n  - name: ...")
        if st.button("Load / reload", key="tools_reload", icon=":material/sync:"):
            st.session_state.pop("tools_upload_unloaded", None)
            with st.spinner("Loading tools (and starting MCP servers)…"):
                _reload(registry, st.session_state.get("tools_yaml", ""))
        if msg := st.session_state.pop("tools_message", None):
            (st.error if msg[0] == "error" else st.success)(msg[1])


def _reload(registry: Any, text: str) -> None:
    """Replace this session's editor tools with `text`'s (all or none), keeping the rest."""
    try:
        _refuse_python_tools(text)
        fresh = registry.copy()
        for name in st.session_state.get("tools_from_editor", []):
            fresh.unregister(name)
        names = fresh.load_yaml_text(text, SESSION_SOURCE) if text.strip() else []
    except ConfigError as e:
        st.session_state["tools_message"] = ("error", str(e))
        return
    st.session_state["tool_registry"] = fresh
    registry.close_mcp(SESSION_SOURCE)  # the servers the replaced YAML started
    st.session_state["tools_from_editor"] = names
    st.session_state["tools_message"] = ("ok", f"Loaded {len(names)} tool(s): {', '.join(names) or 'none'}")
    st.rerun()


def _refuse_python_tools(text: str) -> None:
    import yaml

    if state.settings().enable_shell_tool:
        return
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return  # the loader reports the syntax error with its position
    entries = data.get("tools", []) if isinstance(data, dict) else data
    servers = data.get("mcp", []) if isinstance(data, dict) else []
    servers = servers if isinstance(servers, list) else []  # the loader reports a wrong shape
    bad = [str(e.get("name", "?")) for e in entries or [] if isinstance(e, dict) and "python" in e]
    if bad:
        raise ConfigError(f"{SESSION_SOURCE}: tool(s) {', '.join(bad)} use 'python:', which runs code on the server; "
                          "from the browser only 'http:' and 'manual: true' tools are allowed. Put python tools "
                          "in a file listed in CHATGLM_TOOLS (or enable the shell tool, which grants the same power).")
    bad = [str(e.get("name", "?")) for e in servers if isinstance(e, dict) and "command" in e]
    if bad:
        raise ConfigError(f"{SESSION_SOURCE}: mcp server(s) {', '.join(bad)} use 'command:', which runs a program on "
                          "the server; from the browser only 'url:' MCP servers are allowed. Put command servers in "
                          "a file listed in CHATGLM_TOOLS (or enable the shell tool, which grants the same power).")


def manual_registry(registry: Any) -> Any:
    """A copy where every tool is manual: the agent pauses for the user's observation on each call."""
    manual = registry.copy()
    for tool in registry.tools(include_disabled=True):
        manual.register(None, spec={"name": tool.name, "description": tool.description,
                                    "parameters": tool.parameters}, source=tool.source)
        if not registry.is_enabled(tool.name):
            manual.set_enabled(tool.name, False)
    return manual
