"""Tools the model can call: registry, schema derivation, YAML tools and the built-ins.

The module-level functions keep ChatGLM3's names (`register_tool`, `get_tools`, `dispatch_tool`)
and act on the process's default registry, built on first use from `configure(settings)` (or
default settings): the built-ins, `custom_tools.yaml` and the files in CHATGLM_TOOLS, with the
tools of the MCP servers those files list (`tools.mcp_tools`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools.registry import Tool, ToolError, ToolRegistry, ToolResult

__all__ = [
    "Tool", "ToolError", "ToolRegistry", "ToolResult", "build_registry", "configure", "default_registry",
    "dispatch_tool", "get_tools", "load_tools_yaml", "register_tool",
]

_default: ToolRegistry | None = None
_lock = threading.Lock()


def build_registry(settings: Any) -> ToolRegistry:
    """A registry with the built-ins and every YAML file; bad files end up in `.load_errors`."""
    from tools.builtins import register_builtins
    from tools.yaml_tools import load_all

    registry = ToolRegistry.from_settings(settings)
    register_builtins(registry, settings)
    load_all(registry, settings)
    return registry


def configure(settings: Any) -> ToolRegistry:
    """(Re)build the default registry from these settings."""
    global _default
    with _lock:
        _default = build_registry(settings)
        return _default


def default_registry() -> ToolRegistry:
    """The process's registry, built from default settings on first use unless configured."""
    global _default
    if _default is None:
        from chatglm_core.settings import load_settings

        with _lock:
            if _default is None:
                _default = build_registry(load_settings())
    return _default


def register_tool(func: Callable[..., Any] | None = None, *, timeout: float | None = None) -> Any:
    """Decorator: make a typed, documented function a tool of the default registry."""
    return default_registry().register(func, timeout=timeout)


def get_tools() -> list[dict[str, Any]]:
    return default_registry().get_tools()


def dispatch_tool(name: str, arguments: dict[str, Any]) -> ToolResult:
    return default_registry().dispatch(name, arguments)


def load_tools_yaml(path: str | Path) -> list[str]:
    return default_registry().load_yaml(path)
