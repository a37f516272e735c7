"""Constrained decoding: grammars that make tool calls and JSON replies always well-formed.

A `Constraint` (chatglm_core.backends.base) becomes an xgrammar grammar, compiled once per
(tokenizer, vocabulary size, constraint) and cached — compiling takes milliseconds to seconds,
masking a token takes microseconds. `logits_processor` returns a fresh transformers
LogitsProcessor per request (they track the request's parse state).

Call syntaxes, per prompt format:
  - "hf": ``<tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>``; the name is one of
    the offered tools and the arguments follow that tool's JSON Schema (xgrammar's JSON Schema
    support, strict: no undeclared keys).
  - "chatglm3": ChatGLM3's own ``<tool>\\n```python\\ntool_call(k=v, ...)\\n```\\``, with each value
    a Python literal of the schema's type; the EBNF for it is generated here from the schema
    (`python_call_grammar`). Plain-text replies start with "\\n" (ChatGLM3's empty metadata line).
With ``auto=True`` the reply is free text until the call opening appears; from there on the
call is decoded under the grammar.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from typing import Any

from chatglm_core.backends.base import Constraint
from chatglm_core.errors import RequestError
from chatglm_core.formats.base import function_specs
from chatglm_core.formats.parsing import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

#: Whitespace runs inside generated JSON are capped: a small model under a grammar otherwise
#: tends to fill its budget with newlines.
MAX_JSON_WHITESPACE = 1
#: End-of-turn tokens accepted when the grammar is complete (those present in the vocabulary).
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|user|>",
              "<|observation|>")
#: A tiny model can loop inside a string or a list ("custom_custom_custom...") until its token
#: budget runs out, cutting the call off. In tool calls, strings and arrays without their own
#: bounds get these, so a call always closes; the arguments stay valid under the tool's schema.
MAX_STRING_CHARS = 96
MAX_ARRAY_ITEMS = 12
#: A free string in a call is also kept from holding the call's own markup: a small model that
#: wants to end the call while inside a string otherwise writes `}}</tool_call>` into it, and the
#: grammar keeps it there. It is not empty, its first character can't be a space or a closing
#: bracket, and `<` can't be followed by `/` or `t` (`a < b` stays possible). Quotes and backslashes
#: are left out, as in xgrammar's own maxLength strings. (xgrammar 0.2.8 ignores a character class
#: at the start of an optional group, `^(?:[^}]…)?$`, hence no optional empty string.)
_UNIT = r'(?:[^<"\\\r\n]|<[^/t<"\\\r\n])'
FREE_STRING_PATTERN = r'^[^ \t\r\n<"\\}\]]' + _UNIT + '{0,%d}$'

_CACHE_SIZE = 64

_lock = threading.Lock()
_compilers: dict[tuple[int, int], tuple[Any, Any]] = {}  # (id(tokenizer), vocab) → (tokenizer, compiler)
_grammars: OrderedDict[tuple[Any, ...], Any] = OrderedDict()


def logits_processor(constraint: Constraint, tokenizer: Any, format_name: str) -> Any:
    """A fresh transformers LogitsProcessor enforcing `constraint` (use it for one request only).

    The grammar is compiled (or fetched from the cache) on the first call, when the width of the
    model's logits — which may exceed the tokenizer's vocabulary — is known. Raises RequestError
    for a constraint that cannot be compiled (e.g. an unsupported JSON Schema).
    """
    source = grammar_source(constraint, format_name)  # validates now, before generation starts
    return _processor_class()(tokenizer, source)


def grammar_source(constraint: Constraint, format_name: str) -> tuple[str, Any]:
    """("json_schema" | "structural_tag" | "ebnf", payload) for a constraint; pure."""
    if constraint.kind == "json_schema":
        if not isinstance(constraint.schema, dict):
            raise RequestError("a json_schema constraint needs a schema object", param="response_format")
        return "json_schema", constraint.schema
    if constraint.kind == "json_object":
        return "json_schema", {"type": "object"}
    if constraint.kind != "tool_call":
        raise RequestError(f"unknown constraint kind {constraint.kind!r}")
    specs = _chosen_tools(constraint)
    if format_name == "chatglm3":
        return "ebnf", python_call_grammar(specs, auto=constraint.auto)
    return "structural_tag", json_call_tag(specs, auto=constraint.auto)


def _chosen_tools(constraint: Constraint) -> list[dict[str, Any]]:
    specs = function_specs(list(constraint.tools))
    if constraint.tool_name is not None:
        specs = [s for s in specs if s["name"] == constraint.tool_name]
        if not specs:
            raise RequestError(f"tool_choice names {constraint.tool_name!r}, which is not among the tools",
                               param="tool_choice")
    if not specs:
        raise RequestError("a tool_call constraint needs at least one tool", param="tools")
    return specs


def json_call_tag(specs: list[dict[str, Any]], *, auto: bool) -> dict[str, Any]:
    """The structural tag for `<tool_call>{"name": ..., "arguments": ...}</tool_call>`."""
    tags = [{
        "type": "tag",
        "begin": f'{TOOL_CALL_OPEN}{{"name": {json.dumps(s["name"], ensure_ascii=False)}, "arguments": ',
        "content": {"type": "json_schema", "json_schema": bounded(_arguments_schema(s)),
                    "max_whitespace_cnt": MAX_JSON_WHITESPACE},
        "end": "}" + TOOL_CALL_CLOSE,
    } for s in specs]
    if auto:
        fmt: dict[str, Any] = {"type": "triggered_tags", "triggers": [TOOL_CALL_OPEN], "tags": tags}
    else:
        fmt = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
    return {"type": "structural_tag", "format": fmt}


def _arguments_schema(spec: dict[str, Any]) -> dict[str, Any]:
    params = spec.get("parameters") or {}
    return params if params.get("type") == "object" else {"type": "object"}


def bounded(schema: Any) -> Any:
    """`schema` with MAX_STRING_CHARS / MAX_ARRAY_ITEMS on strings and arrays that set no bound, free
    strings kept clear of the call's markup, and `x-grammar-pattern` (a tool's hint) as the pattern."""
    if isinstance(schema, list):
        return [bounded(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded(v) if k != "enum" and k != "const" else v for k, v in schema.items()}
    kinds = out.get("type") if isinstance(out.get("type"), list) else [out.get("type")]
    if kinds == ["string"] and isinstance(out.get("x-grammar-pattern"), str) and "pattern" not in out:
        out["pattern"] = out.pop("x-grammar-pattern")  # a tool's hint for the grammar only (see tools.builtins)
    free = not any(k in out for k in ("enum", "const", "pattern", "format"))
    if kinds == ["string"] and free and "maxLength" not in out and "minLength" not in out:
        out["pattern"] = FREE_STRING_PATTERN % (MAX_STRING_CHARS - 1)
    elif "string" in kinds and free and "maxLength" not in out:
        out["maxLength"] = max(MAX_STRING_CHARS, out.get("minLength", 0))
    if "array" in kinds and "maxItems" not in out and "prefixItems" not in out:
        out["maxItems"] = max(MAX_ARRAY_ITEMS, out.get("minItems", 0))
    return out


# --- ChatGLM3: tool_call(k=<python literal>, ...) ------------------------------------------------
_PY_BASE = r'''
py_value ::= py_str | py_num | "True" | "False" | "None" | py_list | py_dict
py_str ::= "'" ([^'\\\r\n] | "\\" [^\r\n])* "'" | "\"" ([^"\\\r\n] | "\\" [^\r\n])* "\""
py_int ::= "-"? ("0" | [1-9] [0-9]*)
py_num ::= py_int ("." [0-9]+)? ([eE] [-+]? [0-9]+)?
py_list ::= "[" (py_value (", " py_value)*)? "]"
py_dict ::= "{" (py_str ": " py_value (", " py_str ": " py_value)*)? "}"
any_text ::= [^]*
'''


def python_call_grammar(specs: list[dict[str, Any]], *, auto: bool) -> str:
    """EBNF for ChatGLM3's call turn, `name\\n```python\\ntool_call(k=v, ...)\\n```` over `specs`."""
    rules: list[str] = []
    calls = []
    for i, spec in enumerate(specs):
        params = _arguments_schema(spec)
        props = params.get("properties") or {}
        required = [k for k in props if k in set(params.get("required") or [])]
        optional = [k for k in props if k not in required]
        parts = {k: f"{_lit(k + '=')} {_py_rule(props[k], rules, f't{i}_{j}')}" for j, k in enumerate(props)}
        args = _sequence([parts[k] for k in required], [parts[k] for k in optional])
        calls.append(f"{_lit(spec['name'] + chr(10) + '```python' + chr(10) + 'tool_call(')} {args} "
                     f"{_lit(')' + chr(10) + '```')}")
    root = " | ".join(f"({c})" for c in calls)
    if auto:  # a text reply has an empty metadata line; "interpreter" opens code
        root += ' | "\\n" any_text | "interpreter\\n" any_text'
    return f"root ::= {root}\n" + "\n".join(rules) + _PY_BASE


def _sequence(required: list[str], optional: list[str]) -> str:
    """Comma-separated parts: all of `required` in order, then any subset of `optional` in order."""
    if required:
        head = ' ", " '.join(required)
        return "(" + head + "".join(f' (", " {o})?' for o in optional) + ")"
    if not optional:
        return '""'
    alts = [optional[i] + "".join(f' (", " {o})?' for o in optional[i + 1:]) for i in range(len(optional))]
    return "(" + " | ".join(f"({a})" for a in alts) + ")?"


def _py_rule(schema: Any, rules: list[str], name: str) -> str:
    """An EBNF expression for a Python literal valid under (a practical subset of) `schema`."""
    if not isinstance(schema, dict):
        return "py_value"
    if "const" in schema:
        return _lit(repr(schema["const"]))
    if "enum" in schema:
        return "(" + " | ".join(_lit(repr(v)) for v in schema["enum"]) + ")"
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return "(" + " | ".join(_py_rule(s, rules, f"{name}_{i}") for i, s in enumerate(schema[key])) + ")"
    kind = schema.get("type")
    if isinstance(kind, list):
        return "(" + " | ".join(_py_rule({**schema, "type": k}, rules, f"{name}_{k}") for k in kind) + ")"
    simple = {"string": "py_str", "integer": "py_int", "number": "py_num", "boolean": '("True" | "False")',
              "null": '"None"'}
    if kind in simple:
        return simple[kind]
    if kind == "array":
        if isinstance(schema.get("prefixItems"), list):
            items = [_py_rule(s, rules, f"{name}_{i}") for i, s in enumerate(schema["prefixItems"])]
            return '"[" ' + ' ", " '.join(items) + ' "]"'
        item = _py_rule(schema.get("items"), rules, f"{name}_item")
        rules.append(f'{name} ::= "[" ({item} (", " {item})*)? "]"')
        return name
    if kind == "object" and isinstance(schema.get("properties"), dict):
        props = schema["properties"]
        required = set(schema.get("required") or [])
        parts = {k: f"{_lit(repr(k) + ': ')} {_py_rule(v, rules, f'{name}_{i}')}" for i, (k, v) in enumerate(props.items())}
        body = _sequence([p for k, p in parts.items() if k in required], [p for k, p in parts.items() if k not in required])
        rules.append(f'{name} ::= "{{" {body} "}}"')
        return name
    if kind == "object":
        value = _py_rule(schema.get("additionalProperties"), rules, f"{name}_value")
        rules.append(f'{name} ::= "{{" (py_str ": " {value} (", " py_str ": " {value})*)? "}}"')
        return name
    return "py_value"


def _lit(text: str) -> str:
    """An EBNF string literal."""
    return json.dumps(text, ensure_ascii=False)


# --- compiling and caching ---------------------------------------------------------------------
def _stop_token_ids(tokenizer: Any) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _compiler(tokenizer: Any, vocab_size: int) -> Any:
    import xgrammar as xgr

    key = (id(tokenizer), vocab_size)
    with _lock:
        entry = _compilers.get(key)
        if entry is None or entry[0] is not tokenizer:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                      stop_token_ids=_stop_token_ids(tokenizer))
            entry = _compilers[key] = (tokenizer, xgr.GrammarCompiler(info, max_threads=2))
        return entry[1]


def compiled_grammar(tokenizer: Any, vocab_size: int, source: tuple[str, Any]) -> Any:
    """The compiled grammar for `source`, from the cache when it was compiled before."""
    kind, payload = source
    key = (id(tokenizer), vocab_size, kind, json.dumps(payload, sort_keys=True, ensure_ascii=False))
    with _lock:
        if key in _grammars:
            _grammars.move_to_end(key)
            return _grammars[key]
    compiler = _compiler(tokenizer, vocab_size)
    try:
        if kind == "json_schema":
            grammar = compiler.compile_json_schema(payload, strict_mode=payload != {"type": "object"},
                                                   max_whitespace_cnt=MAX_JSON_WHITESPACE)
        elif kind == "structural_tag":
            grammar = compiler.compile_structural_tag(payload)
        else:
            grammar = compiler.compile_grammar(payload)
    except (RuntimeError, ValueError) as e:  # xgrammar reports unsupported schemas this way
        raise RequestError(f"cannot build a grammar for this {kind.replace('_', ' ')}: {e}",
                           param="response_format" if kind == "json_schema" else "tools") from None
    with _lock:
        _grammars[key] = grammar
        while len(_grammars) > _CACHE_SIZE:
            _grammars.popitem(last=False)
    return grammar


@functools.cache
def _processor_class() -> type:
    """Built on first use so importing this module does not import transformers."""
    from transformers import LogitsProcessor
    from xgrammar.contrib.hf import LogitsProcessor as XGrammarProcessor

    class GrammarLogitsProcessor(LogitsProcessor):
        """Compiles (or fetches) the grammar on the first step, when the logits' width is known,
        then delegates to xgrammar's HF processor."""

        def __init__(self, tokenizer: Any, source: tuple[str, Any]) -> None:
            self.tokenizer = tokenizer
            self.source = source
            self._inner: Any = None

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if self._inner is None:
                self._inner = XGrammarProcessor(compiled_grammar(self.tokenizer, int(scores.shape[-1]), self.source))
            return self._inner(input_ids, scores)

    return GrammarLogitsProcessor
