"""chatglm_core: the engine behind the workbench (no Streamlit, HTTP or Gradio in here).

Public names are imported lazily so `import chatglm_core` stays fast (no torch until needed).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "chat": "chatglm_core.chat",
    "stream_chat": "chatglm_core.chat",
    "get_engine": "chatglm_core.chat",
    "Engine": "chatglm_core.engine",
    "GenerationOptions": "chatglm_core.backends.base",
    "Message": "chatglm_core.messages",
    "Role": "chatglm_core.messages",
    "ToolCall": "chatglm_core.messages",
    "Settings": "chatglm_core.settings",
    "load_settings": "chatglm_core.settings",
    "Sandbox": "chatglm_core.sandbox",
    "ExecResult": "chatglm_core.sandbox",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        # Importing chatglm_core.chat binds the *module* to the package's `chat`; rebind the function,
        # or `from chatglm_core import chat` would hand out the module.
        globals()[name] = value
        return value
    raise AttributeError(f"module 'chatglm_core' has no attribute {name!r}")
