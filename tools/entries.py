"""The named entries of a tools YAML file (`tools:` and `mcp:`), each validated by its pydantic model.

One problem line per bad field, and one per name defined twice, so that a file with several mistakes
is fixed in one go; `tools.yaml_tools` and `tools.mcp_tools` build their messages from these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def validated_entries(raw_entries: list[Any], model: type[M], kind: str,
                      problem: Callable[[dict[str, Any]], str]) -> tuple[list[M], list[str]]:
    """(the entries `model` accepts, problem lines "<kind> 'name': <problem(error)>"); an entry whose
    name came earlier in the file is kept and reported."""
    entries: list[M] = []
    problems: list[str] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_entries):
        label = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else f"#{i + 1}"
        try:
            entry = model.model_validate(raw)
        except ValidationError as e:
            problems += [f"{kind} {label!r}: {problem(err)}" for err in e.errors()]
            continue
        name = entry.name  # type: ignore[attr-defined]
        if name in seen:
            problems.append(f"{kind} {name!r}: name: defined twice in this file")
        seen.add(name)
        entries.append(entry)
    return entries, problems
