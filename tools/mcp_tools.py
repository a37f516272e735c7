"""MCP servers declared in a tools YAML (`mcp:`): validated with the file, started, their tools registered.

An entry names a stdio server (`command`, optional `env`) or a streamable HTTP one (`url`, optional
`headers`), with an optional `tools` allow-list and `timeout`. The file's problems with these
entries join the file's one ConfigError (`entry_problems`). Starting happens after the file's own
tools are registered (`start_servers`): servers start in parallel, each tool listed by `tools/list`
goes through `ToolRegistry.register` with the server's JSON Schema, and a name that is taken gets
the server's name as a prefix (`git_status`). A server that fails to start, a tool whose schema or
name is unusable, or a clash that remains even with the prefix becomes a warning naming the file,
the server and the tool; the other servers and tools load. The registry owns the connections and
closes them when the file is reloaded or replaced.
"""

from __future__ import annotations

import shlex
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from chatglm_core.errors import ConfigError
from tools.entries import validated_entries
from tools.mcp_client import McpConnection, McpStartError, RemoteTool, ServerConfig
from tools.registry import NAME_RE, ToolRegistry

#: A server's name prefixes its tools' names on a clash, so it is kept short.
SERVER_NAME = r"^[A-Za-z0-9_-]{1,32}$"
#: Our own timeout on a call ends a little after the connection's, so the connection's clearer
#: message ("did not answer … within N s") is the one the model reads.
CALL_MARGIN = 2.0
#: Starting a server may take longer than a call (an interpreter starting, a first `npx` download).
START_TIMEOUT = 60.0


class McpEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=SERVER_NAME)
    command: list[str] | None = Field(None, min_length=1)
    env: dict[str, str] = {}
    url: str | None = None
    headers: dict[str, str] = {}
    tools: list[str] | None = None
    timeout: float = Field(30.0, gt=0, le=3600)

    @field_validator("command", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return shlex.split(v) if isinstance(v, str) else v

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v

    @model_validator(mode="after")
    def _one_transport(self) -> McpEntry:
        if (self.command is None) == (self.url is None):
            raise ValueError("command/url: give exactly one of command: [program, args...] (stdio) or "
                             "url: http://... (HTTP)")
        if self.env and self.command is None:
            raise ValueError("env: is for command (stdio) servers; an HTTP server takes headers")
        if self.headers and self.url is None:
            raise ValueError("headers: are for url (HTTP) servers; a command server takes env")
        return self

    def config(self) -> ServerConfig:
        return ServerConfig(self.name, tuple(self.command or ()), dict(self.env), self.url, dict(self.headers),
                            self.timeout, max(self.timeout, START_TIMEOUT))


def entry_problems(raw_entries: list[Any]) -> tuple[list[McpEntry], list[str]]:
    """Validate the `mcp:` list: the entries, and one problem line per bad field ("mcp server 'x': field: …")."""
    return validated_entries(raw_entries, McpEntry, "mcp server", _problem)


def _problem(err: dict[str, Any]) -> str:
    field_name = ".".join(map(str, err["loc"]))
    if err["type"] == "model_type":
        return "each server must be a mapping of keys (name, command or url, ...)"
    if not field_name:  # the checks across fields name their fields themselves
        return err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{field_name}: unknown key (allowed: {', '.join(McpEntry.model_fields)})"
    if err["type"] == "missing":
        return f"{field_name}: missing required field"
    return f"{field_name}: {err['msg'].removeprefix('Value error, ')}"


def start_servers(registry: ToolRegistry, entries: list[McpEntry], source: str) -> list[str]:
    """Start `entries` (in parallel), register their tools from `source`; returns the names registered.
    Problems are appended to `registry.warnings`; nothing here raises for a server's failure."""
    if not entries:
        return []
    connections = [McpConnection(e.config()) for e in entries]
    with ThreadPoolExecutor(max_workers=min(8, len(entries)), thread_name_prefix="mcp-start") as pool:
        outcomes = list(pool.map(_start, connections))
    names: list[str] = []
    for entry, conn, outcome in zip(entries, connections, outcomes):
        if isinstance(outcome, str):
            registry.warnings.append(f"{source}: {outcome}")
            continue
        added, problems = _register(registry, entry, conn, outcome, source)
        registry.warnings += [f"{source}: mcp server {entry.name!r}: {p}" for p in problems]
        if added:
            registry.own_mcp(source, conn)
            names += added
        else:
            conn.close()
            if not problems:
                registry.warnings.append(f"{source}: mcp server {entry.name!r} offers no tools"
                                         + (" named in its tools: list" if entry.tools is not None else ""))
    return names


def _start(conn: McpConnection) -> list[RemoteTool] | str:
    try:
        return conn.start()
    except McpStartError as e:
        return str(e)


def _register(registry: ToolRegistry, entry: McpEntry, conn: McpConnection, listed: list[RemoteTool],
              source: str) -> tuple[list[str], list[str]]:
    """Register the allowed tools of one server; (names registered, problems). A remaining name clash
    is a problem for that tool only."""
    wanted = set(entry.tools) if entry.tools is not None else None
    by_name = {t.name: t for t in listed}
    problems = [f"tools: {n!r} is not offered by the server (it offers: {', '.join(by_name) or 'none'})"
                for n in entry.tools or [] if n not in by_name]
    added = []
    for remote in listed:
        if wanted is not None and remote.name not in wanted:
            continue
        if not NAME_RE.match(remote.name):
            problems.append(f"tool {remote.name!r} skipped: its name is not 1-64 letters, digits, '_' or '-'")
            continue
        name = _free_name(registry, remote.name, entry.name)
        if name is None:
            problems.append(f"tool {remote.name!r}: the name is taken and so is {entry.name + '_' + remote.name!r}; "
                            "rename the server (its name is the prefix) or leave the tool out with tools: [...]")
            continue
        spec = {"name": name, "description": remote.description.strip() or f"{remote.name} (MCP server {entry.name})",
                "parameters": remote.input_schema}
        try:
            registry.register(_caller(conn, remote.name), spec=spec, timeout=entry.timeout + CALL_MARGIN,
                              source=f"{source} · mcp server {entry.name!r}")
        except ConfigError as e:
            problems.append(f"skipped {e}")
            continue
        added.append(name)
    return added, problems


def _free_name(registry: ToolRegistry, name: str, prefix: str) -> str | None:
    for candidate in (name, f"{prefix}_{name}"):
        if NAME_RE.match(candidate) and candidate not in registry:
            return candidate
    return None


def _caller(conn: McpConnection, tool: str) -> Any:
    def call(**arguments: Any) -> Any:
        return conn.call(tool, arguments)

    call.__name__ = tool
    return call
