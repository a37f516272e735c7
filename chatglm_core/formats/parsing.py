"""Parsing a finished assistant turn into text, tool calls or a code-interpreter call.

Pure functions over strings. Model output is parsed with `ast` and `json` only — never
evaluated (ChatGLM3's demo `eval`s it, which runs whatever the model writes).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from chatglm_core.errors import ParseError
from chatglm_core.messages import INTERPRETER, Message, Role, ToolCall

# a fence closes only at the start of a line, so ``` inside a string argument doesn't end the block
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def extract_code_block(text: str, languages: tuple[str, ...] = ("python", "py", "")) -> str | None:
    """The body of the first fenced block in one of `languages` ('' = no language); None if none.

    An unclosed fence at the end of the text (a reply cut off by a stop) counts as closed.
    """
    for m in _FENCE.finditer(text):
        if m.group(1).lower() in languages:
            return m.group(2).rstrip("\n")
    return None


def literal_kwargs(code: str) -> dict[str, Any]:
    """`tool_call(city='Beijing', days=3)` → {'city': 'Beijing', 'days': 3}, by `ast` only.

    Each argument must be a Python literal (str, number, bool, None, list, dict, tuple, set).
    """
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError as e:
        raise ParseError(f"tool call is not valid Python syntax ({e.msg}): {code.strip()[:200]!r}") from None
    except (ValueError, RecursionError, MemoryError) as e:  # a lone surrogate, a null byte, deep nesting
        raise ParseError(f"tool call can't be parsed ({type(e).__name__}: {str(e)[:100]}): {code.strip()[:200]!r}") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id != "tool_call":
        raise ParseError(f"expected `tool_call(name=value, ...)`, got {code.strip()[:200]!r}")
    if call.args:
        raise ParseError("tool_call arguments must be passed by keyword, e.g. tool_call(city='Beijing')")
    out: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ParseError("tool_call does not accept **kwargs; pass each argument by name")
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ParseError(f"argument {kw.arg!r} of tool_call is not a literal value") from None
    return out


def parse_chatglm3_turn(text: str, *, tools: bool = False, interpreter: bool = False) -> Message:
    """ChatGLM3's assistant turn: a metadata line (tool name, 'interpreter' or empty), then content.

    With an empty metadata line the turn is plain text. With a tool name, the content holds a
    ```python block with `tool_call(...)`. With 'interpreter', the content is code to run.
    """
    metadata, sep, content = text.partition("\n")
    if not sep:
        metadata, content = "", text
    name = metadata.strip()
    if not name:
        return Message(Role.ASSISTANT, content.strip())
    if name == INTERPRETER:
        code = extract_code_block(content)
        return Message(Role.ASSISTANT, "", [ToolCall(INTERPRETER, {"code": content.strip() if code is None else code})])
    if not tools and not interpreter:  # no tools offered: a metadata line is just text
        return Message(Role.ASSISTANT, text.strip())
    code = extract_code_block(content)
    if code is None:
        code = content.strip()
    return Message(Role.ASSISTANT, "", [ToolCall(name, literal_kwargs(code))])


_DECODER = json.JSONDecoder()


def parse_json_call(payload: str) -> ToolCall:
    """One `{"name": ..., "arguments": {...}}` object (also accepts "parameters")."""
    return _call_from_json(_json_object(payload.strip(), 0)[0], payload)


def _json_object(text: str, pos: int) -> tuple[object, int]:
    """Decode one JSON value at `pos` (raw_decode, so `</tool_call>` inside a string is fine)."""
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as e:
        raise ParseError(f"tool call is not valid JSON ({e.msg} at position {e.pos}): {text[pos:pos + 200]!r}") from None


def _call_from_json(obj: object, source: str) -> ToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ParseError('a tool call must be a JSON object like {"name": "tool", "arguments": {...}}')
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ParseError(f"arguments of {obj['name']!r} are not a JSON object") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ParseError(f"arguments of {obj['name']!r} must be a JSON object, got {type(args).__name__}")
    return ToolCall(obj["name"], args)


def parse_json_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>{...}</tool_call>` in `text` (a missing close tag at the end is tolerated)."""
    calls, pos = [], 0
    while (start := text.find(TOOL_CALL_OPEN, pos)) >= 0:
        body = start + len(TOOL_CALL_OPEN)
        while body < len(text) and text[body].isspace():
            body += 1
        obj, end = _json_object(text, body)
        calls.append(_call_from_json(obj, text))
        rest = text[end:].lstrip()
        if rest.startswith(TOOL_CALL_CLOSE):
            end = len(text) - len(rest) + len(TOOL_CALL_CLOSE)
        pos = end
    return calls


def parse_json_turn(text: str, *, tools: bool = False, interpreter: bool = False) -> Message:
    """The JSON form: text, then zero or more `<tool_call>{...}</tool_call>`; or a ```python block
    when the code interpreter is on."""
    if tools and TOOL_CALL_OPEN in text:
        head = text.split(TOOL_CALL_OPEN, 1)[0].strip()
        return Message(Role.ASSISTANT, head, parse_json_calls(text))
    if interpreter:
        code = extract_code_block(text, ("python", "py"))
        if code is not None and code.strip():
            head = text.split("```", 1)[0].strip()
            return Message(Role.ASSISTANT, head, [ToolCall(INTERPRETER, {"code": code})])
    return Message(Role.ASSISTANT, text.strip())


def render_tool_call_python(call: ToolCall) -> str:
    """A call in ChatGLM3's form (the inverse of `literal_kwargs`)."""
    args = ", ".join(f"{k}={v!r}" for k, v in call.arguments.items())
    return f"```python\ntool_call({args})\n```"


def render_tool_call_json(call: ToolCall) -> str:
    body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"
