"""A typed Python function → an OpenAI tool spec, derived by library code and checked on definition.

The schema comes from `transformers.utils.get_json_schema` (Google-style docstring + annotations).
ChatGLM3's style, `Annotated[type, "description", required]` with a docstring that has no
``Args:`` section, is accepted too: its descriptions and required flags are folded into the
docstring/signature that `get_json_schema` reads, so ChatGLM3 users' tools work unchanged.
Every problem raises ConfigError naming the function and, where there is one, the parameter.
"""

from __future__ import annotations

import copy
import inspect
import typing
from collections.abc import Callable
from typing import Any, get_args, get_origin

import jsonschema

from chatglm_core.errors import ConfigError

PARAMETERS_META = jsonschema.Draft202012Validator


def function_spec(func: Callable[..., Any]) -> dict[str, Any]:
    """{name, description, parameters} of a typed, documented function; raises ConfigError."""
    from transformers.utils import get_json_schema
    from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

    name = getattr(func, "__name__", repr(func))
    shim = _google_style_view(func, name)
    try:
        spec = get_json_schema(shim)["function"]
    except (DocstringParsingException, TypeHintParsingException) as e:
        raise ConfigError(f"tool {name!r}: {e}. Annotate every parameter with a JSON-compatible type and "
                          "describe it in the docstring's Args: section.") from None
    spec.pop("return", None)  # the model never generates it; OpenAI specs have no such key
    spec["parameters"] = _normalize(spec["parameters"])
    if not spec.get("description"):
        raise ConfigError(f"tool {name!r}: the docstring's first paragraph (the tool's description) is empty")
    check_parameters_schema(spec["parameters"], f"tool {name!r}")
    return spec


def check_parameters_schema(schema: Any, where: str) -> None:
    """A tool's `parameters` must be a valid JSON Schema describing an object."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ConfigError(f"{where}: parameters must be a JSON Schema with \"type\": \"object\"")
    try:
        PARAMETERS_META.check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "/".join(map(str, e.absolute_path)) or "(top level)"
        raise ConfigError(f"{where}: parameters is not a valid JSON Schema at {path}: {e.message}") from None
    except RecursionError:
        raise ConfigError(f"{where}: parameters is nested too deeply to check: flatten the schema") from None


def _google_style_view(func: Callable[..., Any], name: str) -> Callable[..., Any]:
    """`func` as get_json_schema expects it; ChatGLM3 `Annotated` parameters are unwrapped."""
    if not callable(func):
        raise ConfigError(f"tool {name!r} is not callable")
    try:
        hints = typing.get_type_hints(func, include_extras=True)
        signature = inspect.signature(func)
    except (NameError, TypeError, ValueError) as e:
        raise ConfigError(f"tool {name!r}: cannot read its annotations ({e})") from None
    annotated = {}
    for pname, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConfigError(f"tool {name!r}: parameter {pname!r}: *args/**kwargs cannot be described to a model")
        if get_origin(hints.get(pname)) is typing.Annotated:
            annotated[pname] = _annotated_parts(name, pname, hints[pname])
    if not annotated:
        return func

    doc = inspect.getdoc(func) or ""
    from transformers.utils.chat_template_utils import parse_google_format_docstring
    description, arg_docs, _ = parse_google_format_docstring(doc) if doc else (None, {}, None)
    description = description or doc.strip()
    params, arg_lines, plain_hints = [], [], {}
    for pname, param in signature.parameters.items():
        base, desc, required = annotated.get(pname, (hints.get(pname, param.annotation), None, None))
        desc = desc or (arg_docs or {}).get(pname, "")
        if required is not None:  # ChatGLM3's flag decides what the schema marks required
            param = param.replace(default=inspect.Parameter.empty if required else None)
        # keyword-only, so a required parameter may follow one that got a default
        params.append(param.replace(annotation=base, kind=inspect.Parameter.KEYWORD_ONLY))
        plain_hints[pname] = base
        if desc:
            arg_lines.append(f"    {pname}: {desc}")

    def shim() -> None: ...

    shim.__name__ = name
    shim.__doc__ = description + ("\n\nArgs:\n" + "\n".join(arg_lines) if arg_lines else "")
    shim.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    shim.__annotations__ = plain_hints
    return shim


def _annotated_parts(func_name: str, pname: str, hint: Any) -> tuple[Any, str, bool | None]:
    base, *meta = get_args(hint)
    where = f"tool {func_name!r}: parameter {pname!r}"
    if not meta or not isinstance(meta[0], str):
        raise ConfigError(f"{where}: Annotated[type, \"description\", required] needs a string description")
    if len(meta) > 1 and not isinstance(meta[1], bool):
        raise ConfigError(f"{where}: the third Annotated item (required) must be True or False")
    return base, meta[0], meta[1] if len(meta) > 1 else None


def _normalize(schema: Any) -> Any:
    """get_json_schema marks Optional[X] with OpenAPI's `nullable`; JSON Schema (and jsonschema,
    xgrammar) spell it as a "null" alternative. Tuples get their length bounds."""
    if isinstance(schema, list):
        return [_normalize(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _normalize(v) for k, v in copy.deepcopy(schema).items()}
    if "prefixItems" in out and "items" not in out:  # a fixed-length tuple: say so to validators
        out.setdefault("minItems", len(out["prefixItems"]))
        out.setdefault("maxItems", len(out["prefixItems"]))
    if out.pop("nullable", False):
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
        elif isinstance(t, list) and "null" not in t:
            out["type"] = [*t, "null"]
        elif "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    return out


def tuple_params(func: Callable[..., Any]) -> set[str]:
    """Parameters annotated as tuples: JSON delivers lists, ChatGLM3-style tools check for tuples."""
    try:
        hints = typing.get_type_hints(func)
    except (NameError, TypeError):  # function_spec already reported unreadable hints
        return set()
    return {p for p, h in hints.items() if p != "return" and (h is tuple or get_origin(h) is tuple)}
