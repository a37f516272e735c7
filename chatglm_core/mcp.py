"""``python -m chatglm_core.mcp [--port 8765]``: the registry's tools served over MCP.

Any MCP client (Claude Desktop, an IDE, another agent, the SDK's own `Client`) can then list and
call the tools declared here: the built-ins, `custom_tools.yaml`, the files in CHATGLM_TOOLS (or
`--tools`), including the tools of the MCP servers those files name. Without `--port` it speaks
stdio (the client starts it); with `--port` it serves streamable HTTP at ``/mcp`` on loopback
unless `--host` says otherwise. It is an adapter like the HTTP API: a tools/list answer is the
registry's specs with their explicit JSON Schemas, a tools/call is `ToolRegistry.dispatch` run off
the event loop (validation, timeouts and error results as for the model). Manual tools are left
out: no one is there to type their results.
"""

from __future__ import annotations

import argparse
import base64
import logging
import sys
from typing import Any



def build_server(registry: Any) -> Any:
    """An MCP low-level `Server` whose tools are `registry`'s enabled, automatic tools."""
    import anyio
    import mcp.types as types
    from mcp.server.lowlevel import Server

    def served() -> list[Any]:
        return [t for t in registry.tools() if not t.manual]

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[
            types.Tool(name=t.name, description=t.description, input_schema=t.parameters) for t in served()])

    async def call_tool(ctx: Any, params: Any) -> types.CallToolResult:
        if params.name not in {t.name for t in served()}:
            names = ", ".join(t.name for t in served()) or "none"
            return types.CallToolResult(content=[types.TextContent(
                type="text", text=f"Error: unknown tool {params.name!r}. Available tools: {names}.")], is_error=True)
        result = await anyio.to_thread.run_sync(registry.dispatch, params.name, params.arguments or {})
        content: list[Any] = [types.TextContent(type="text", text=result.content)]
        content += [types.ImageContent(type="image", data=base64.b64encode(img).decode("ascii"),
                                       mime_type=_mime(img)) for img in result.images]
        return types.CallToolResult(content=content, is_error=not result.ok)

    return Server("chatglm-workbench-tools", version="1", on_list_tools=list_tools, on_call_tool=call_tool)


def _mime(data: bytes) -> str:
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "image/png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m chatglm_core.mcp", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, help="serve streamable HTTP on this port (default: stdio)")
    p.add_argument("--host", default="127.0.0.1", help="address for --port (default 127.0.0.1)")
    p.add_argument("--tools", help="YAML tool files, separated by the OS path separator (CHATGLM_TOOLS)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # stdout is the protocol's channel under stdio: everything else goes to stderr
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from chatglm_core.settings import load_settings
    from tools import build_registry
    from tools.mcp_client import close_all

    settings = load_settings(**({"tools": args.tools} if args.tools else {}))
    registry = build_registry(settings)
    for problem in [*map(str, registry.load_errors), *registry.warnings]:
        print(f"warning: {problem}", file=sys.stderr)
    server = build_server(registry)
    try:
        if args.port is None:
            _serve_stdio(server)
        else:
            import uvicorn

            served = [t for t in registry.tools() if not t.manual]
            print(f"serving {len(served)} tools at http://{args.host}:{args.port}/mcp", file=sys.stderr)
            app = server.streamable_http_app(host=args.host)
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        close_all()
    return 0


def _serve_stdio(server: Any) -> None:
    import anyio
    from mcp.server.stdio import stdio_server

    async def run() -> None:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(run)


if __name__ == "__main__":
    sys.exit(main())
