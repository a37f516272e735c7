"""Custom tools from YAML files: a schema-checked spec plus one way to run it.

Each file is loaded all-or-none: every problem in it (unknown keys, missing fields, an invalid
JSON Schema, duplicate names, a callable that will not import, a bad `mcp:` server entry) is
gathered into ONE ConfigError naming the file, the tool or server and the field. The file's
`mcp:` servers start once its tools are registered (`tools.mcp_tools`). `load_all` loads the
bundled `custom_tools.yaml` and the files in CHATGLM_TOOLS; a bad file is reported and skipped,
never taking other tools down.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from chatglm_core.errors import ConfigError
from tools.entries import validated_entries
from tools.mcp_tools import entry_problems, start_servers
from tools.registry import NAME_RE, ToolError, ToolRegistry
from tools.schema import check_parameters_schema

BUNDLED = Path(__file__).with_name("custom_tools.yaml")


class HttpSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    method: Literal["GET", "POST"] = "GET"
    headers: dict[str, str] = {}

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class ToolEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE.pattern)
    description: str = Field(min_length=1)
    parameters: dict[str, Any] = {"type": "object", "properties": {}}
    python: str | None = None
    http: HttpSpec | None = None
    manual: bool = False
    timeout: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_runner(self) -> ToolEntry:
        if sum([self.python is not None, self.http is not None, self.manual]) != 1:
            raise ValueError("give exactly one of python: module:function, http: {url: ...} or manual: true")
        return self


def load_all(registry: ToolRegistry, settings: Any) -> list[ConfigError]:
    """Load the bundled file and settings.tool_files(); return (and keep) the errors, one per bad file."""
    errors = []
    for path in [BUNDLED, *settings.tool_files()]:
        try:
            load_yaml_file(registry, path)
        except ConfigError as e:
            errors.append(e)
    registry.load_errors = errors
    return errors


def load_yaml_file(registry: ToolRegistry, path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the tools file ({e.strerror}); fix the path in CHATGLM_TOOLS") from None
    return load_yaml_text(registry, text, str(path), path.resolve().parent)


def load_yaml_text(registry: ToolRegistry, text: str, source: str, base_dir: Path | None = None) -> list[str]:
    """Register the tools in `text` and start its MCP servers; returns the tools' names. Raises one
    ConfigError listing every problem in the file (a server that fails to start is a warning)."""
    entries, servers = _entries(text, source)
    mcp_entries, problems = entry_problems(servers)
    tool_entries, tool_problems = validated_entries(entries, ToolEntry, "tool", _pydantic_problem)
    problems += tool_problems
    staged = []
    for entry in tool_entries:
        other = registry.get(entry.name)
        if other is not None and other.source != source and not other.source.startswith(f"{source} · "):
            problems.append(f"tool {entry.name!r}: name: already defined by {other.source}")
        try:
            check_parameters_schema(entry.parameters, f"tool {entry.name!r}: parameters")
            staged.append((entry, _runner(entry, base_dir)))
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(f"{source}: " + ("; ".join(problems) if len(problems) == 1 else
                                           "\n  - " + "\n  - ".join(problems)))
    registry.close_mcp(source)  # the servers this file started last time
    for entry, run in staged:
        spec = {"name": entry.name, "description": entry.description, "parameters": entry.parameters}
        registry.register(run, spec=spec, timeout=entry.timeout, source=source)
    return [entry.name for entry, _ in staged] + start_servers(registry, mcp_entries, source)


def _entries(text: str, source: str) -> tuple[list[Any], list[Any]]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:  # PyYAML parses nesting recursively
        raise ConfigError(f"{source}: nested too deeply to load: flatten the file") from None
    if data is None:
        return [], []
    try:
        size = _expanded_size(data, {})
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to load: flatten the file") from None
    if size is None:
        raise ConfigError(f"{source}: a YAML alias refers to a value that contains it (a cycle): remove it")
    if size > MAX_VALUES:
        raise ConfigError(f"{source}: the file expands to more than {MAX_VALUES:,} values; YAML aliases (*name) "
                          "repeat whole values: write the tools out plainly")
    if not isinstance(data, dict) or not data or not set(data) <= {"tools", "mcp"} or \
            not all(isinstance(v, list) for v in data.values()):
        raise ConfigError(f"{source}: the file's top-level keys must be tools: (a list of tool entries) "
                          "and/or mcp: (a list of MCP servers)")
    return data.get("tools", []), data.get("mcp", [])


#: The most values (scalars, lists, mappings) a tools file may expand to once its aliases are
#: resolved: a few lines of nested aliases ("billion laughs") otherwise expand to gigabytes when a
#: tool's schema is written into the prompt.
MAX_VALUES = 100_000


def _expanded_size(node: Any, memo: dict[int, int | None]) -> int | None:
    """How many values `node` holds with aliases expanded (each shared value counted once per
    use), without expanding anything; None if an alias makes it contain itself."""
    key = id(node)
    if key in memo:
        return memo[key]
    if isinstance(node, dict | list):
        memo[key] = None  # in progress: meeting it again below means a cycle
        children = [c for kv in node.items() for c in kv] if isinstance(node, dict) else node
        total = 1
        for child in children:
            n = _expanded_size(child, memo)
            if n is None:
                return None
            total += n
            if total > MAX_VALUES:
                break
        memo[key] = total
        return total
    return 1


def _pydantic_problem(err: dict[str, Any]) -> str:
    field_name = ".".join(map(str, err["loc"])) or "entry"
    if err["type"] == "extra_forbidden":
        return f"{field_name}: unknown key (allowed: {', '.join(ToolEntry.model_fields)})"
    if err["type"] == "missing":
        return f"{field_name}: missing required field"
    if err["type"] == "model_type":
        return "each tool must be a mapping of keys (name, description, ...)"
    return f"{field_name}: {err['msg']}"


def _runner(entry: ToolEntry, base_dir: Path | None) -> Any:
    if entry.manual:
        return None
    if entry.http is not None:
        return _http_runner(entry.http, entry.timeout or 10.0)
    func = _import_callable(entry.python or "", base_dir, entry.name)
    _check_signature(func, entry)
    return func


def _import_callable(target: str, base_dir: Path | None, tool: str) -> Any:
    where = f"tool {tool!r}: python"
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: {target!r} must look like package.module:function")
    added = base_dir is not None and str(base_dir) not in sys.path
    if added:  # let a file next to the YAML be imported; the module stays cached after
        sys.path.insert(0, str(base_dir))
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - user code at import: any failure is a config problem
        raise ConfigError(f"{where}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    finally:
        if added:
            sys.path.remove(str(base_dir))
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {target!r} is not callable")
    return obj


def _check_signature(func: Any, entry: ToolEntry) -> None:
    """The callable must accept every declared parameter and need nothing the schema may omit."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return  # builtins without a signature: checked when called
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    declared = set(entry.parameters.get("properties", {}))
    required = set(entry.parameters.get("required", []))
    unknown = sorted(declared - set(params))
    if unknown:
        raise ConfigError(f"tool {entry.name!r}: parameters: {entry.python} does not accept {', '.join(unknown)}")
    needed = sorted(n for n, p in params.items() if p.default is p.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in required)
    if needed:
        raise ConfigError(f"tool {entry.name!r}: parameters: {entry.python} needs {', '.join(needed)}, "
                          "which the schema does not list as required")


def _http_runner(spec: HttpSpec, timeout: float) -> Any:
    def call(**arguments: Any) -> str:
        import httpx

        try:
            if spec.method == "GET":
                resp = httpx.get(spec.url, params=arguments, headers=spec.headers, timeout=timeout)
            else:
                resp = httpx.post(spec.url, json=arguments, headers=spec.headers, timeout=timeout)
        except httpx.HTTPError as e:
            raise ToolError(f"HTTP request to {spec.url} failed: {type(e).__name__}: {e}") from None
        if resp.status_code >= 400:
            raise ToolError(f"{spec.url} answered HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.text

    return call
