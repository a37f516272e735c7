"""The Code Interpreter's kernel: one sandbox per browser, its controls and its files.

The pool is process-wide (st.cache_resource) and keyed by the browser's client id, so a refresh
finds the same kernel and working directory; idle kernels are reaped by the pool. A kernel that
fails to start is an error on this browser's page only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from chatglm_core.messages import INTERPRETER, Message, Role, ToolCall, ToolCallEvent, ToolResultEvent
from webui import state
from webui.bubbles import escape_md

MAX_DOWNLOAD_BYTES = 50_000_000
MAX_LISTED_FILES = 50


@st.cache_resource(show_spinner=False)
def pool() -> Any:
    from chatglm_core.sandbox_pool import SandboxPool

    return SandboxPool(state.settings())


def sandbox() -> Any | None:
    """This browser's sandbox (started on first use); None after showing why it could not start."""
    try:
        with st.spinner("Starting the Python kernel…"):
            return pool().get(state.client_id())
    except Exception as e:  # a kernel that will not start breaks this page only
        st.error(f"The Python kernel could not start: {type(e).__name__}: {e}. "
                 "Check IPYKERNEL (a kernel spec name) and the sandbox limits, then press *Restart kernel*.")
        return None


def show() -> None:
    with st.sidebar:
        st.subheader("Kernel", divider="gray")
        running = state.client_id() in pool()
        c1, c2 = st.columns(2)
        if c1.button("Interrupt", key="kernel_interrupt", icon=":material/stop:", disabled=not running):
            pool().get(state.client_id()).interrupt()
            st.toast("Sent an interrupt to the kernel")
        if c2.button("Restart", key="kernel_restart", icon=":material/restart_alt:", help="Restart the kernel: variables are lost, files stay"):
            _restart()
        box = pool().get(state.client_id()) if running else None
        if box is not None:
            st.caption(f"Isolation: {box.isolation}")
        _files(box)


def _restart() -> None:
    try:
        if state.client_id() in pool():
            pool().get(state.client_id()).restart()
        else:
            pool().get(state.client_id())
        st.toast("Kernel restarted: variables are gone, files stay")
    except Exception as e:
        st.error(f"Restart failed: {type(e).__name__}: {e}")


def _files(box: Any | None) -> None:
    with st.expander("Files", expanded=False):
        uploads = st.file_uploader("Upload into the working directory", accept_multiple_files=True,
                                   key="kernel_upload")
        done: set[str] = st.session_state.setdefault("kernel_uploaded", set())
        for up in uploads or []:
            if up.file_id in done:
                continue
            box = box or sandbox()
            if box is None:
                return
            target = box.work_dir / Path(up.name).name  # a bare name: no writing outside the directory
            target.write_bytes(up.getvalue())
            done.add(up.file_id)
            st.caption(f"uploaded {target.name}")
        if box is None:
            st.caption("The kernel starts with the first code the model runs.")
            return
        files = sorted(p for p in box.work_dir.rglob("*") if p.is_file() and not p.is_symlink()
                       and not _hidden(p.relative_to(box.work_dir)))
        for p in files[:MAX_LISTED_FILES]:
            rel = p.relative_to(box.work_dir).as_posix()
            size = p.stat().st_size
            if size > MAX_DOWNLOAD_BYTES:
                st.caption(f"{rel} ({size // 1_000_000} MB, too large to download here)")
                continue
            # deferred read, and no rerun on click (a rerun would stop a generation in flight)
            st.download_button(f"{escape_md(rel)} ({_size(size)})", lambda p=p: p.read_bytes(), p.name,
                               key=f"dl_{rel}", icon=":material/download:", on_click="ignore")
        if len(files) > MAX_LISTED_FILES:
            st.caption(f"…and {len(files) - MAX_LISTED_FILES} more")


def _hidden(rel: Path) -> bool:
    """Dot files and folders (the kernel's .cache/fontconfig, .config/matplotlib…) and __pycache__:
    the kernel's housekeeping, not the user's files."""
    return any(part.startswith(".") or part == "__pycache__" for part in rel.parts)


def _size(n: int) -> str:
    return f"{n} B" if n < 1000 else f"{n / 1000:.0f} kB" if n < 1_000_000 else f"{n / 1_000_000:.1f} MB"


def run_code_events(box: Any, call: ToolCall, backend: Any) -> Any:
    """Run an edited cell directly (no model), as the events an agent round would give (its output
    capped in tokens for `backend`'s context window, as the agent caps it)."""
    from chatglm_core.agent import exec_result_text
    from chatglm_core.context import cap_result

    yield ToolCallEvent(call)
    result = exec_result_text(box.run(call.code))
    message = Message(Role.TOOL, cap_result(result.content, backend), tool_call_id=call.id, name=INTERPRETER,
                      images=result.images)
    yield ToolResultEvent(call, message, result.ok)
