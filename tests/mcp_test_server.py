"""A small MCP server (stdio) for the failure cases real servers don't show on demand.

    python tests/mcp_test_server.py [--bad-schema] [--hang-at-start] [--crash-at-start]

Tools: `echo(text)`; `picture()` (text + a PNG + an embedded text resource); `fail()` (an isError
result); `hang(seconds)` (sleeps); `die()` (the process exits mid-call); `spawn()` (starts a
grandchild that would outlive a careless client, and returns its pid); `environ()` (its environment's
variable names); `garbage()` (a malformed result). With --bad-schema it also
lists `broken`, whose input schema is not a valid JSON Schema.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time

import anyio
import mcp.types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

# a 1x1 PNG
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
                       "AAAABJRU5ErkJggg==")


def _tool(name: str, description: str, properties: dict | None = None, required: list | None = None) -> types.Tool:
    schema = {"type": "object", "properties": properties or {}, "required": required or []}
    return types.Tool(name=name, description=description, input_schema=schema)


TOOLS = [
    _tool("echo", "Repeat the text.", {"text": {"type": "string"}}, ["text"]),
    _tool("picture", "A picture with a caption and a note."),
    _tool("fail", "Always fails."),
    _tool("hang", "Sleep for a while.", {"seconds": {"type": "number"}}, ["seconds"]),
    _tool("die", "Exit the server process."),
    _tool("spawn", "Start a long-lived grandchild process."),
    _tool("environ", "The names of the server's environment variables."),
    _tool("garbage", "Answers with a result that is not a CallToolResult."),
]
BROKEN = types.Tool(name="broken", description="Its schema is not one.",
                    input_schema={"type": "object", "properties": {"n": {"type": "integr"}}})


async def list_tools(ctx, params) -> types.ListToolsResult:
    return types.ListToolsResult(tools=TOOLS + ([BROKEN] if "--bad-schema" in sys.argv else []))


def text(s: str) -> types.TextContent:
    return types.TextContent(type="text", text=s)


async def call_tool(ctx, params) -> types.CallToolResult:
    args = params.arguments or {}
    if params.name == "echo":
        return types.CallToolResult(content=[text(str(args.get("text")))])
    if params.name == "picture":
        resource = types.TextResourceContents(uri="note://1", mime_type="text/plain", text="a note")
        return types.CallToolResult(content=[
            text("a red dot"),
            types.ImageContent(type="image", data=base64.b64encode(PNG).decode(), mime_type="image/png"),
            types.EmbeddedResource(type="resource", resource=resource)])
    if params.name == "fail":
        return types.CallToolResult(content=[text("the widget is broken")], is_error=True)
    if params.name == "hang":
        await anyio.sleep(float(args.get("seconds", 3600)))
        return types.CallToolResult(content=[text("woke up")])
    if params.name == "die":
        os._exit(7)
    if params.name == "garbage":  # built without validation, so it goes out malformed
        return types.CallToolResult.model_construct(content="not a list of blocks", is_error=False)
    if params.name == "environ":
        return types.CallToolResult(content=[text(" ".join(sorted(os.environ)))])
    if params.name == "spawn":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        return types.CallToolResult(content=[text(str(child.pid))])
    return types.CallToolResult(content=[text(f"unknown tool {params.name}")], is_error=True)


async def main() -> None:
    if "--crash-at-start" in sys.argv:
        sys.stderr.write("test server: missing configuration, giving up\n")
        sys.exit(3)
    if "--hang-at-start" in sys.argv:
        time.sleep(3600)
    server = Server("test-server", on_list_tools=list_tools, on_call_tool=call_tool)
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


if __name__ == "__main__":
    anyio.run(main)
