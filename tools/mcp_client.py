"""One MCP server connection, driven from sync code through one background event loop.

The official `mcp` SDK is async and its transports hold anyio task groups that must be entered and
left by the same task. So each server gets one long-lived task on the process's single MCP event
loop (a daemon thread, started on first use): it opens the connection (a stdio subprocess or
streamable HTTP), lists the tools, then waits until `close()`. Calls from any thread are
`run_coroutine_threadsafe` onto that loop with a timeout; a call that times out is cancelled there.

Stdio servers get only their declared `env` plus PATH (run through ``env -i``: the SDK would add
HOME, USER, SHELL…), and their stderr goes to a temporary file whose last lines explain a failure.
The SDK stops a stdio server by closing its stdin, then terminating its process group if it lingers;
processes the server started and left in its group are killed after it (the SDK spares them when
the server exits by itself). `close_all` runs at exit; a server left behind by a killed app still
sees its stdin close.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from tools.registry import ToolError, ToolResult

log = logging.getLogger(__name__)
#: How long closing may take: the SDK waits 2 s for an exit after stdin closes, then 2 s after SIGTERM.
CLOSE_TIMEOUT = 8.0
_STDERR_TAIL = 600


@dataclass(frozen=True)
class ServerConfig:
    """What it takes to reach one server (validated from the YAML by `tools.mcp_tools`)."""

    name: str
    command: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 30.0  # for each call
    start_timeout: float = 60.0  # for starting and listing the tools: a first `uvx`/`npx` run downloads


@dataclass(frozen=True)
class RemoteTool:
    """A tool as the server listed it."""

    name: str
    description: str
    input_schema: Any


class McpStartError(Exception):
    """The server could not be started or listed its tools wrongly; the message names it."""


# --- the one event loop ---------------------------------------------------------------------
class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mcp-loop", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


_loop: _Loop | None = None
_loop_lock = threading.Lock()
_live: weakref.WeakSet[McpConnection] = weakref.WeakSet()


def _event_loop() -> _Loop:
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = _Loop()
            atexit.register(close_all)
        return _loop


def close_all() -> None:
    """Stop every running server (at exit, and for tests)."""
    for conn in list(_live):
        conn.close()


def running() -> list[McpConnection]:
    return [c for c in list(_live) if c.alive]


# --- one server -------------------------------------------------------------------------------
class McpConnection:
    """A started server: `start()` once, then `call()` from any thread, `close()` when done."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.error: str | None = None  # why it stopped, once it has
        self._client: Any = None
        self._stop: asyncio.Event | None = None
        self._task: concurrent.futures.Future[Any] | None = None
        self._finished = threading.Event()  # set once the connection (and its process) is gone
        self._stderr = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") if config.command else None
        self.pid: int | None = None  # a stdio server's process (and process group) id

    @property
    def label(self) -> str:
        return f"MCP server {self.config.name!r}"

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and self._client is not None

    def start(self) -> list[RemoteTool]:
        """Connect and list the tools; raises McpStartError (and leaves nothing running)."""
        if self.config.command:
            self._check_command()
        loop = _event_loop()
        ready: concurrent.futures.Future[list[RemoteTool]] = concurrent.futures.Future()
        self._task = loop.submit(self._serve(ready))
        _live.add(self)
        try:
            return ready.result(self.config.start_timeout)
        except concurrent.futures.TimeoutError:
            self.close()
            raise McpStartError(f"{self.label} did not start within {self.config.start_timeout:g} s"
                                f"{self._stderr_tail()}") from None
        except McpStartError:
            self.close()
            raise

    def call(self, tool: str, arguments: dict[str, Any]) -> ToolResult:
        """Call a tool; failures raise ToolError (the registry turns it into an error result)."""
        client = self._client
        if client is None or not self.alive:
            raise ToolError(f"{self.label} is not running ({self.error or 'stopped'}); reload the tools file "
                            "to restart it")
        future = _event_loop().submit(client.call_tool(tool, arguments))
        try:
            result = future.result(self.config.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ToolError(f"{self.label} did not answer {tool!r} within {self.config.timeout:g} s") from None
        except Exception as e:  # noqa: BLE001 - anything the SDK or a dead server raises is the call's failure
            if type(e).__name__ == "ValidationError":  # pydantic's, on a result that breaks the protocol
                raise ToolError(f"{self.label} answered {tool!r} with a malformed result ({_describe(e)})") from None
            raise ToolError(f"{self.label} failed on {tool!r}: {_describe(e)}{self._stderr_tail()}") from None
        return result_to_tool_result(result)

    def close(self) -> None:
        """Stop the server and wait (bounded) until its process is gone. Idempotent."""
        task, stop = self._task, self._stop
        if task is not None and not self._finished.is_set() and threading.current_thread() is _event_loop().thread:
            # called on the loop itself (a registry collected there): waiting would block the shutdown
            if stop is not None:
                stop.set()
            else:
                task.cancel()
            return
        if task is not None and not self._finished.is_set():
            if self._client is not None and stop is not None:  # running: let the SDK shut it down in order
                _event_loop().loop.call_soon_threadsafe(stop.set)
                if not self._finished.wait(CLOSE_TIMEOUT):
                    task.cancel()
            else:  # still starting: cancel; the SDK's shutdown is shielded and still stops the process
                task.cancel()
            if not self._finished.wait(CLOSE_TIMEOUT):
                log.warning("%s did not stop within %g s", self.label, CLOSE_TIMEOUT)
        self._close_stderr()

    # --- on the loop ----------------------------------------------------------------------
    async def _serve(self, ready: concurrent.futures.Future[list[RemoteTool]]) -> None:
        from mcp import Client
        from mcp.types import Implementation

        self._stop = asyncio.Event()
        try:
            async with contextlib.AsyncExitStack() as stack:
                stack.callback(self._kill_group)
                transport = await self._transport(stack)
                client = await stack.enter_async_context(Client(
                    transport, cache=None, client_info=Implementation(name="chatglm-workbench", version="1")))
                self.pid = _stdio_pid(transport)
                tools = await _list_tools(client)
                self._client = client
                if not ready.done():
                    ready.set_result(tools)
                await self._stop.wait()
        except BaseException as e:  # noqa: BLE001 - whatever ended the connection is reported, not raised
            self.error = _describe(e)
            if not ready.done():
                ready.set_exception(McpStartError(f"{self.label} failed to start: {self.error}{self._stderr_tail()}"))
            if not isinstance(e, Exception | asyncio.CancelledError):
                raise
        finally:
            self._client = None
            if self.error is None:
                self.error = "closed"
            self._finished.set()

    async def _transport(self, stack: contextlib.AsyncExitStack) -> Any:
        if self.config.url is not None:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            http = await stack.enter_async_context(httpx2.AsyncClient(
                headers=self.config.headers, timeout=httpx2.Timeout(self.config.timeout, read=300)))
            return streamable_http_client(self.config.url, http_client=http)
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client

        path = os.environ.get("PATH", os.defpath)
        program, *args = self.config.command
        env_args = [f"{k}={v}" for k, v in {"PATH": path, **self.config.env}.items()]
        params = StdioServerParameters(command=shutil.which("env") or "/usr/bin/env",
                                       args=["-i", *env_args, _program(program), *args])
        return stdio_client(params, errlog=self._stderr)

    # --- helpers --------------------------------------------------------------------------
    def _kill_group(self) -> None:
        """Kill what the server left in its process group (it ran in a session of its own)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def _check_command(self) -> None:
        program = _program(self.config.command[0])
        if shutil.which(program, path=os.environ.get("PATH", os.defpath)) is None:
            raise McpStartError(f"{self.label}: command {self.config.command[0]!r} was not found on PATH")

    def _stderr_tail(self) -> str:
        if self._stderr is None or self._stderr.closed:
            return ""
        try:
            self._stderr.flush()
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - 4 * _STDERR_TAIL))
            text = self._stderr.read().strip()[-_STDERR_TAIL:]
        except (OSError, ValueError):
            return ""
        return f". Its stderr ends: {text}" if text else ""

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            with contextlib.suppress(OSError):
                self._stderr.close()


def _stdio_pid(transport: Any) -> int | None:
    """The server's pid, read from the SDK's stdio_client while it is open (its process is a local
    there; the SDK exposes no accessor). None if that ever changes: only the group sweep is lost."""
    frame = getattr(getattr(transport, "gen", None), "ag_frame", None)
    process = frame.f_locals.get("process") if frame is not None else None
    return getattr(process, "pid", None)


def _program(name: str) -> str:
    """`python`/`python3` mean the app's own interpreter, so a server installed beside it is found."""
    return sys.executable if name in ("python", "python3") else name


async def _list_tools(client: Any) -> list[RemoteTool]:
    tools, cursor = [], None
    for _ in range(100):  # a server whose pages never end cannot hang the start
        page = await client.list_tools(cursor=cursor)
        tools += [RemoteTool(t.name, t.description or "", t.input_schema) for t in page.tools]
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def _describe(e: BaseException) -> str:
    """The innermost real error of an (ExceptionGroup of) exception(s), as one line."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    if isinstance(e, asyncio.CancelledError):
        return "cancelled"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --- results ---------------------------------------------------------------------------------
def result_to_tool_result(result: Any) -> ToolResult:
    """A CallToolResult as the observation the model reads: text blocks in order, a placeholder for
    each image (the bytes go to the UI), audio and resources described; isError makes it an error."""
    parts: list[str] = []
    images: list[bytes] = []
    for block in result.content or []:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind == "image":
            try:
                images.append(base64.b64decode(block.data, validate=True))
                parts.append(f"[Image {len(images)}: {block.mime_type}]")
            except (binascii.Error, ValueError):
                parts.append(f"[an image ({block.mime_type}) that was not valid base64]")
        elif kind == "audio":
            parts.append(f"[Audio: {block.mime_type}, not shown]")
        elif kind == "resource_link":
            parts.append(f"[Resource: {block.name} {block.uri}]")
        elif kind == "resource":
            res = block.resource
            text = getattr(res, "text", None)
            kind_of = res.mime_type or "unknown type"
            parts.append(text if text is not None else f"[Binary resource {res.uri} ({kind_of})]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(p for p in parts if p) or "(no output)"
    if result.is_error:
        return ToolResult(text if text.startswith("Error") else f"Error: {text}", ok=False, images=images)
    return ToolResult(text, images=images)
