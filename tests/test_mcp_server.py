"""`python -m chatglm_core.mcp`: the SDK's own client lists and calls our tools over stdio and HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest
from mcp import Client, StdioServerParameters

ROOT = Path(__file__).resolve().parents[1]
TEST_SERVER = str(Path(__file__).with_name("mcp_test_server.py"))


@pytest.fixture
def tools_file(tmp_path):
    """A YAML with a manual tool (not served: no one types its result) and an MCP server (proxied)."""
    path = tmp_path / "extra.yaml"
    path.write_text("tools:\n  - {name: ask_boss, description: Ask the boss., manual: true}\n"
                    f"mcp:\n  - {{name: t, command: [python, {TEST_SERVER}]}}\n")
    return str(path)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def text(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def exercise(client: Client) -> None:
    listed = {t.name: t for t in (await client.list_tools()).tools}
    assert {"calculator", "convert_units", "echo", "picture"} <= set(listed)
    assert "ask_boss" not in listed and "ask_colleague" not in listed
    assert listed["convert_units"].input_schema["required"] == ["value", "from_unit", "to_unit"]
    ok = await client.call_tool("calculator", {"expression": "6 * 7"})
    assert not ok.is_error and text(ok) == "42"
    bad = await client.call_tool("calculator", {"expression": "1/0"})
    assert bad.is_error and "division by zero" in text(bad)
    invalid = await client.call_tool("convert_units", {"value": "ten"})
    assert invalid.is_error and "invalid arguments" in text(invalid)
    units = await client.call_tool("convert_units", {"value": 2, "from_unit": "km", "to_unit": "m"})
    assert '"value": 2000.0' in text(units)
    # a tool of the MCP server the YAML names, served on: text and image come through
    picture = await client.call_tool("picture", {})
    assert "a red dot" in text(picture) and [c.mime_type for c in picture.content if c.type == "image"] == ["image/png"]
    unknown = await client.call_tool("ask_boss", {"question": "?"})
    assert unknown.is_error and "unknown tool 'ask_boss'" in text(unknown)


def our_processes() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


def test_stdio(tools_file):
    before = our_processes()
    params = StdioServerParameters(command=sys.executable, args=["-m", "chatglm_core.mcp", "--tools", tools_file],
                                   env={"PYTHONPATH": str(ROOT)}, cwd=str(ROOT))

    async def main() -> None:
        async with Client(params) as client:
            await exercise(client)

    anyio.run(main)
    time.sleep(0.5)
    assert our_processes() - before == set()  # our server and the server it proxied are gone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_streamable_http_on_loopback(tools_file):
    before = our_processes()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chatglm_core.mcp", "--port", str(port), "--tools", tools_file],
                            cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/mcp"

    async def main() -> None:
        for _ in range(600):
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {proc.stderr.read()}")
            try:
                async with Client(url) as client:
                    await exercise(client)
                return
            except OSError:
                await anyio.sleep(0.2)
            except Exception as e:  # the SDK wraps a refused connection in an ExceptionGroup
                if "ConnectError" not in repr(e):
                    raise
                await anyio.sleep(0.2)
        raise AssertionError("the server did not come up")

    try:
        anyio.run(main)
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections() if c.status == psutil.CONN_LISTEN]
        assert [a.ip for a in listening] == ["127.0.0.1"]  # loopback unless --host says otherwise
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    time.sleep(0.5)
    assert our_processes() - before == set()  # SIGTERM stopped it and the server it proxied
