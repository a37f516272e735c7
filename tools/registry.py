"""The tool registry: one `register` path, OpenAI `tools` specs out, guarded dispatch in.

Built-in tools, `@register_tool` functions and YAML tools all end up as a `Tool` through
`ToolRegistry.register`, which validates the name, the description and the parameters' JSON
Schema when the tool is defined. `dispatch` is the one place where a tool's failure is caught:
bad arguments, exceptions and timeouts come back as an error `ToolResult` the model can read,
never as an exception. A process has one default registry (`tools.default_registry()`); each
browser session works on its own `copy()`, so its uploads and enable/disable switches stay its own.
A registry owns the MCP server connections its YAML files started (`own_mcp`): reloading a file
closes that file's servers (`close_mcp`), and so does the registry's garbage collection; a copy
shares the tools but owns none of them.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from chatglm_core.errors import ConfigError
from tools.schema import check_parameters_schema, function_spec, tuple_params

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolError(Exception):
    """Raised by a tool for an expected failure; the model sees just the message."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    func: Callable[..., Any] | None  # None: a manual tool, the user types its result
    timeout: float | None = None  # None: the registry's default
    source: str = ""  # where it was defined: "builtin", "module:function" or a YAML file
    tuple_params: frozenset[str] = frozenset()

    @property
    def manual(self) -> bool:
        return self.func is None

    def spec(self) -> dict[str, Any]:
        """The OpenAI `tools` entry."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": json.loads(json.dumps(fn))}


@dataclass
class ToolResult:
    """What the model sees of a call. `ok` is False for every kind of failure."""

    content: str
    ok: bool = True
    truncated: bool = False
    images: list[bytes] = field(default_factory=list)


class ToolRegistry:
    def __init__(self, *, timeout: float = 10.0, max_result_chars: int = 4096) -> None:
        self.timeout = timeout
        self.max_result_chars = max_result_chars
        self._tools: dict[str, Tool] = {}
        self._disabled: set[str] = set()
        self.load_errors: list[ConfigError] = []  # from load_all: shown to the user, never fatal
        self.warnings: list[str] = []  # MCP servers that failed to start, tools skipped: shown, never fatal
        self._mcp: dict[str, list[Any]] = {}  # source → the McpConnections its file started

    @classmethod
    def from_settings(cls, settings: Any) -> ToolRegistry:
        return cls(timeout=settings.tool_timeout, max_result_chars=settings.tool_result_max_chars)

    # --- defining tools -------------------------------------------------------------------
    def register(
        self,
        func: Callable[..., Any] | None = None,
        *,
        spec: dict[str, Any] | None = None,
        timeout: float | None = None,
        source: str | None = None,
    ) -> Any:
        """Add a tool; raises ConfigError naming the tool and what is wrong.

        `register(func)` derives the spec from `func`'s annotations and docstring (usable as a
        decorator). `register(func, spec={name, description, parameters})` takes the spec as
        given (YAML tools); `func=None` with a spec is a manual tool. Re-registering a name from
        the same source replaces it (a page rerun, a re-uploaded file); another source clashes.
        """
        if func is None and spec is None:  # used as @registry.register(timeout=...)
            return lambda f: self.register(f, timeout=timeout, source=source)
        if spec is None:
            spec = function_spec(func)
            source = source or f"{getattr(func, '__module__', '?')}:{getattr(func, '__qualname__', '?')}"
        tool = self._make_tool(func, spec, timeout, source or "")
        old = self._tools.get(tool.name)
        if old is not None and old.source != tool.source:
            raise ConfigError(f"tool {tool.name!r} is already defined by {old.source or 'another source'}; "
                              "rename one of them")
        self._tools[tool.name] = tool
        return func if func is not None else tool

    @staticmethod
    def _make_tool(func: Callable[..., Any] | None, spec: dict[str, Any], timeout: float | None,
                   source: str) -> Tool:
        name = spec.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(f"tool name {name!r} is invalid: use 1-64 letters, digits, '_' or '-'")
        description = spec.get("description")
        if not isinstance(description, str) or not description.strip():
            raise ConfigError(f"tool {name!r}: description must be a non-empty string")
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}
        check_parameters_schema(parameters, f"tool {name!r}")
        if func is not None and not callable(func):
            raise ConfigError(f"tool {name!r}: {func!r} is not callable")
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"tool {name!r}: timeout must be a positive number of seconds")
        tuples = frozenset(tuple_params(func)) if func is not None else frozenset()
        return Tool(name, description.strip(), parameters, func, timeout, source, tuples)

    def unregister(self, name: str) -> None:
        self._tools.pop(name, None)
        self._disabled.discard(name)

    def copy(self) -> ToolRegistry:
        """An independent registry with the same tools (for one browser session)."""
        other = ToolRegistry(timeout=self.timeout, max_result_chars=self.max_result_chars)
        other._tools = dict(self._tools)
        other._disabled = set(self._disabled)
        other.load_errors = list(self.load_errors)
        other.warnings = list(self.warnings)
        return other

    # --- MCP connections ----------------------------------------------------------------------
    def own_mcp(self, source: str, connection: Any) -> None:
        """Keep `connection` (started for `source`'s file) until that file is reloaded or this registry goes."""
        self._mcp.setdefault(source, []).append(connection)
        weakref.finalize(self, connection.close)

    def close_mcp(self, source: str | None = None) -> None:
        """Stop the MCP servers `source`'s file started (all of them without a source) and drop their tools."""
        for src in [source] if source is not None else list(self._mcp):
            for conn in self._mcp.pop(src, []):
                conn.close()
            for name in [n for n, t in self._tools.items() if t.source.startswith(f"{src} · mcp server ")]:
                self.unregister(name)
            self.warnings = [w for w in self.warnings if not w.startswith(f"{src}: ")]

    def load_yaml(self, path: str | Path) -> list[str]:
        """Register every tool of a YAML file (all or none); raises ConfigError naming file, tool, field."""
        from tools.yaml_tools import load_yaml_file

        return load_yaml_file(self, Path(path))

    def load_yaml_text(self, text: str, source: str, base_dir: Path | None = None) -> list[str]:
        """Like load_yaml for an uploaded file's text; `source` names it in errors."""
        from tools.yaml_tools import load_yaml_text

        return load_yaml_text(self, text, source, base_dir)

    # --- looking up ------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def tools(self, *, include_disabled: bool = False) -> list[Tool]:
        return [t for n, t in self._tools.items() if include_disabled or n not in self._disabled]

    def names(self, *, include_disabled: bool = False) -> list[str]:
        return [t.name for t in self.tools(include_disabled=include_disabled)]

    def set_enabled(self, name: str, enabled: bool = True) -> None:
        if name not in self._tools:
            raise ConfigError(f"no tool named {name!r}; available: {', '.join(self._tools) or 'none'}")
        (self._disabled.discard if enabled else self._disabled.add)(name)

    def is_enabled(self, name: str) -> bool:
        return name in self._tools and name not in self._disabled

    def get_tools(self) -> list[dict[str, Any]]:
        """The enabled tools as an OpenAI `tools` list."""
        return [t.spec() for t in self.tools()]

    # --- calling ---------------------------------------------------------------------------
    def dispatch(self, name: str, arguments: Any) -> ToolResult:
        """Run a tool on the model's arguments; every failure is an error result, never a raise."""
        tool = self._tools.get(name) if self.is_enabled(name) else None
        if tool is None:
            available = ", ".join(self.names()) or "none"
            return ToolResult(f"Error: unknown tool {name!r}. Available tools: {available}.", ok=False)
        if tool.manual:
            return ToolResult(f"Error: {name!r} is answered by the user, not run automatically.", ok=False)
        if not isinstance(arguments, dict):
            return ToolResult(f"Error: arguments of {name!r} must be a JSON object.", ok=False)
        problems = argument_errors(tool.parameters, arguments)
        if problems:
            return ToolResult(f"Error: invalid arguments for {name!r}: {'; '.join(problems)}. "
                              "Call it again with arguments matching its parameters.", ok=False)
        kwargs = {k: tuple(v) if k in tool.tuple_params and isinstance(v, list) else v for k, v in arguments.items()}
        result = call_guarded(lambda: tool.func(**kwargs), tool.timeout or self.timeout, name)
        return self.finish(result)

    def finish(self, result: ToolResult) -> ToolResult:
        """Cap a result's text at max_result_chars, with a marker saying so."""
        if len(result.content) <= self.max_result_chars:
            return result
        cut = len(result.content) - self.max_result_chars
        marker = f"\n…[truncated: {cut} more characters]"
        return ToolResult(result.content[: self.max_result_chars] + marker, result.ok, True, result.images)


def argument_errors(schema: dict[str, Any], arguments: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(arguments), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or 'arguments'}: {e.message}" for e in errors]


def encode_result(value: Any) -> str:
    """A tool's return value as text: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def call_guarded(fn: Callable[[], Any], timeout: float | None, name: str) -> ToolResult:
    """Run `fn` and turn its value, exception or timeout into a ToolResult.

    This is the one place a broad `except` is right: whatever a tool (or the sandbox) does
    wrong, the model gets a readable error and the conversation goes on. With a timeout the
    call runs on a daemon thread; a hung tool is abandoned there (Python cannot kill a thread)
    and the caller moves on.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except ToolError as e:
            box["error"] = f"Error: {e}"
        except Exception as e:  # the dispatcher's one broad except, see the docstring
            log.warning("tool %s failed", name, exc_info=True)
            box["error"] = f"Error: tool {name!r} raised {type(e).__name__}: {e}"

    if timeout is None:
        target()
    else:
        worker = threading.Thread(target=target, name=f"tool-{name}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            return ToolResult(f"Error: tool {name!r} timed out after {timeout:g} s.", ok=False)
    if "error" in box:
        return ToolResult(box["error"], ok=False)
    if "value" not in box:  # the thread ended without returning or raising (SystemExit)
        return ToolResult(f"Error: tool {name!r} exited without a result.", ok=False)
    if isinstance(box["value"], ToolResult):  # callers that shape their own result (the interpreter)
        return box["value"]
    try:
        return ToolResult(encode_result(box["value"]))
    except (TypeError, ValueError) as e:
        return ToolResult(f"Error: the result of {name!r} is not JSON-serialisable: {e}", ok=False)
