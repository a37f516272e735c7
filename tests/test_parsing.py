"""Table tests for the call parsers: ChatGLM3's form, the JSON form, malformed calls."""

import pytest

from chatglm_core.errors import ParseError
from chatglm_core.formats.parsing import (
    extract_code_block,
    literal_kwargs,
    parse_chatglm3_turn,
    parse_json_turn,
    render_tool_call_json,
    render_tool_call_python,
)
from chatglm_core.messages import INTERPRETER, ToolCall


@pytest.mark.parametrize(
    "code, expected",
    [
        ("tool_call(city='Beijing')", {"city": "Beijing"}),
        ("tool_call(a=1, b=2.5, c=True, d=None)", {"a": 1, "b": 2.5, "c": True, "d": None}),
        ("tool_call(xs=[1, 2], m={'k': 'v'}, t=(1,))", {"xs": [1, 2], "m": {"k": "v"}, "t": (1,)}),
        ("tool_call()", {}),
        ("  tool_call(symbol=\"AAPL\")\n", {"symbol": "AAPL"}),
        ("tool_call(n=-3)", {"n": -3}),
    ],
)
def test_literal_kwargs(code, expected):
    assert literal_kwargs(code) == expected


@pytest.mark.parametrize(
    "code, fragment",
    [
        ("tool_call(city=", "not valid Python syntax"),
        ("print('x')", "expected `tool_call"),
        ("tool_call('Beijing')", "by keyword"),
        ("tool_call(**{'a': 1})", "**kwargs"),
        ("tool_call(x=__import__('os').system('id'))", "not a literal"),
        ("tool_call(x=open('/etc/passwd').read())", "not a literal"),
        ("os.system('rm -rf /')", "expected `tool_call"),
        ("tool_call(x=1); import os", "not valid Python syntax"),
        # found by hypothesis in a fresh-clone run: a lone surrogate made ast.parse raise UnicodeEncodeError
        ("\ud800", "can't be parsed"),
        ("tool_call(x='\ud800')", "can't be parsed"),
        ("tool_call(x=1)\x00", "null bytes|can't be parsed"),
        ("tool_call(x=" + "[" * 5000 + "]" * 5000 + ")", "not valid Python syntax|can't be parsed"),
    ],
)
def test_literal_kwargs_rejects(code, fragment):
    with pytest.raises(ParseError, match=fragment.replace("(", r"\(").replace("*", r"\*")):
        literal_kwargs(code)


CHATGLM3_CASES = [
    # (generated text, tools?, expected content, expected calls)
    ("\nHello! How can I help?", False, "Hello! How can I help?", []),
    ("Hello there", False, "Hello there", []),
    ("get_weather\n```python\ntool_call(city='Beijing')\n```", True, "", [("get_weather", {"city": "Beijing"})]),
    ("get_weather\n tool_call(city='Beijing')", True, "", [("get_weather", {"city": "Beijing"})]),
    ("interpreter\n```python\nprint(1+1)\n```", False, "", [(INTERPRETER, {"code": "print(1+1)"})]),
    ("get_weather\n```python\ntool_call(q='a ``` b')\n```", True, "", [("get_weather", {"q": "a ``` b"})]),
    ("interpreter\n```python\nimport math\nmath.pi", False, "", [(INTERPRETER, {"code": "import math\nmath.pi"})]),
    ("note\nsomething", False, "note\nsomething", []),  # no tools offered: metadata is text
]


@pytest.mark.parametrize("text, tools, content, calls", CHATGLM3_CASES)
def test_parse_chatglm3_turn(text, tools, content, calls):
    m = parse_chatglm3_turn(text, tools=tools)
    assert m.content == content
    assert [(c.name, c.arguments) for c in m.tool_calls] == calls


def test_parse_chatglm3_malformed_call_is_a_parse_error():
    with pytest.raises(ParseError):
        parse_chatglm3_turn("get_weather\n```python\ntool_call(city=)\n```", tools=True)


JSON_CASES = [
    ("Paris is the capital.", True, False, "Paris is the capital.", []),
    ('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>', True, False, "", [("f", {"x": 1})]),
    ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', True, False, "Let me check.",
     [("f", {})]),
    ('<tool_call>{"name": "f", "parameters": {"y": "z"}}', True, False, "", [("f", {"y": "z"})]),  # cut at stop
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>', True, False, "", [("f", {"a": 2})]),
    ('<tool_call>{"name":"a","arguments":{}}</tool_call><tool_call>{"name":"b","arguments":{}}</tool_call>',
     True, False, "", [("a", {}), ("b", {})]),
    ('<tool_call>{"name": "f"}</tool_call>', False, False, '<tool_call>{"name": "f"}</tool_call>', []),  # no tools
    ("Run this:\n```python\nprint(2)\n```", False, True, "Run this:", [(INTERPRETER, {"code": "print(2)"})]),
    ("```\nplain fence\n```", False, True, "```\nplain fence\n```", []),
]


@pytest.mark.parametrize("text, tools, interp, content, calls", JSON_CASES)
def test_parse_json_turn(text, tools, interp, content, calls):
    m = parse_json_turn(text, tools=tools, interpreter=interp)
    assert m.content == content
    assert [(c.name, c.arguments) for c in m.tool_calls] == calls


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("<tool_call>{not json}</tool_call>", "not valid JSON"),
        ('<tool_call>["f", 1]</tool_call>', "JSON object like"),
        ('<tool_call>{"name": "", "arguments": {}}</tool_call>', "JSON object like"),
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "must be a JSON object"),
        ('<tool_call>{"name": "f", "arguments": "nope"}</tool_call>', "not a JSON object"),
    ],
)
def test_parse_json_turn_malformed(text, fragment):
    with pytest.raises(ParseError, match=fragment):
        parse_json_turn(text, tools=True)


def test_renderers_round_trip():
    call = ToolCall("get_weather", {"city": "Beijing", "days": 3, "metric": True})
    assert literal_kwargs(extract_code_block(render_tool_call_python(call))) == call.arguments
    parsed = parse_json_turn(render_tool_call_json(call), tools=True).tool_calls[0]
    assert (parsed.name, parsed.arguments) == (call.name, call.arguments)
