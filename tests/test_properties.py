"""Property-based tests: whatever text a model or a client sends, we answer with our own clear errors.

Each property runs `EXAMPLES` generated inputs (hypothesis); raise it with HYPOTHESIS_EXAMPLES.
"""

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from chatglm_core.errors import ParseError, RequestError
from chatglm_core.formats.parsing import (
    literal_kwargs,
    parse_chatglm3_turn,
    parse_json_turn,
    render_tool_call_json,
    render_tool_call_python,
)
from chatglm_core.messages import Message, ToolCall

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "1000"))
many = settings(max_examples=EXAMPLES, deadline=None)

# text biased towards the characters that matter to the parsers
tricky = st.text(alphabet=st.sampled_from(list("tool_call()=,'\"{}[]:\n` <>/|pythonamegrsu0123456789.-\\")) |
                 st.characters(), max_size=200)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | \
    st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True).filter(
    lambda s: s not in {"if", "in", "is", "or", "as", "def", "for", "and", "not", "del", "try", "with", "from",
                        "else", "elif", "pass", "None", "True", "False", "class", "while", "yield", "raise",
                        "async", "await", "break", "import", "global", "lambda", "return", "assert",
                        "except", "finally", "continue", "nonlocal"})


@many
@given(tricky, st.booleans(), st.booleans())
def test_chatglm3_parser_never_crashes(text, tools, interpreter):
    try:
        m = parse_chatglm3_turn(text, tools=tools, interpreter=interpreter)
    except ParseError as e:
        assert str(e)
    else:
        assert isinstance(m, Message)


@many
@given(tricky, st.booleans(), st.booleans())
def test_json_parser_never_crashes(text, tools, interpreter):
    try:
        m = parse_json_turn(text, tools=tools, interpreter=interpreter)
    except ParseError as e:
        assert str(e)
    else:
        assert all(isinstance(c.arguments, dict) for c in m.tool_calls)


@many
@given(st.text(max_size=300))
def test_literal_kwargs_never_evaluates(code):
    try:
        out = literal_kwargs(code)
    except ParseError:
        return
    assert isinstance(out, dict)


@many
@given(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),  # the registry's rule for tool names
       st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_json_calls_round_trip(name, arguments):
    call = ToolCall(name, arguments)
    parsed = parse_json_turn(render_tool_call_json(call), tools=True).tool_calls
    assert [(c.name, c.arguments) for c in parsed] == [(name, arguments)]


@many
@given(identifiers.filter(lambda s: s != "interpreter"),
       st.dictionaries(identifiers, json_values, max_size=5))
def test_chatglm3_calls_round_trip(name, arguments):
    call = ToolCall(name, arguments)
    parsed = parse_chatglm3_turn(f"{name}\n{render_tool_call_python(call)}", tools=True).tool_calls
    assert [(c.name, c.arguments) for c in parsed] == [(name, arguments)]


message_dicts = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["system", "user", "assistant", "tool", "function", "observation", "bogus", 3, None]),
        "content": st.none() | st.text(max_size=30) | st.integers() | st.lists(
            st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=5)})),
        "tool_calls": st.none() | st.lists(st.fixed_dictionaries(
            {"id": st.text(max_size=5), "function": st.fixed_dictionaries(
                {"name": st.text(max_size=5), "arguments": st.text(max_size=20) | json_values})})),
        "tool_call_id": st.none() | st.text(max_size=5),
        "name": st.none() | st.text(max_size=5),
    },
)


@many
@given(message_dicts | json_values)
def test_message_validation_gives_request_errors_only(data):
    try:
        m = Message.from_openai(data)
    except RequestError as e:
        assert str(e)
    else:
        json.dumps(m.to_openai())  # what we accepted serialises back
