"""Constrained decoding with the real SmolLM2: forced calls are always schema-valid.

Grammar acceptance is checked with xgrammar's matcher over SmolLM2's tokenizer; generation runs
the real model (batched, sampled) with and without the constraint and prints both valid rates.
"""

from __future__ import annotations

import json
import time

import jsonschema
import pytest

from chatglm_core.backends.base import Constraint, GenerationOptions
from chatglm_core.constrain import compiled_grammar, grammar_source, logits_processor, python_call_grammar
from chatglm_core.errors import ParseError, RequestError
from chatglm_core.formats.parsing import parse_chatglm3_turn
from chatglm_core.messages import Message, Role


def tool(name, properties, required):
    return {"type": "function", "function": {"name": name, "description": f"The {name} tool.",
            "parameters": {"type": "object", "properties": properties, "required": required}}}


THERMOSTAT = tool("set_thermostat", {"room": {"type": "string", "enum": ["kitchen", "bedroom"]},
                                     "mode": {"type": "string", "enum": ["heat", "cool", "off"]}}, ["room", "mode"])
TRANSFER = tool("transfer_money", {"account_id": {"type": "integer"}, "amount": {"type": "number"}},
                ["account_id", "amount"])
ALARM = tool("set_alarm", {"hour": {"type": "integer"}, "enabled": {"type": "boolean"}}, ["hour", "enabled"])
# bounded like a real tool would be, so any reply fits the token budget (see the benchmark for unbounded)
SHOPPING = tool("add_to_shopping_list", {"items": {"type": "array", "items": {"type": "string", "maxLength": 32},
                                                   "minItems": 1, "maxItems": 6}}, ["items"])
FLIGHT = tool("book_flight", {
    "passenger": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                  "required": ["name", "age"]},
    "route": {"type": "object", "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
              "required": ["from", "to"]}}, ["passenger", "route"])

CASES = [
    (THERMOSTAT, ["Heat the kitchen.", "Cool the bedroom.", "Turn the kitchen off.", "Warm up the bedroom.",
                  "Kitchen: cool please."]),
    (TRANSFER, ["Send 25.50 to account 1234.", "Transfer 100 to account 42.", "Pay 9.99 to account 7.",
                "Move 3000 to account 555.", "Give account 88 the amount 12.75."]),
    (ALARM, ["Wake me up at 7.", "Disable my 6 o'clock alarm.", "Alarm at 22.", "Turn off the alarm at 9.",
             "Set an alarm for 5."]),
    (SHOPPING, ["Add milk and eggs to my list.", "I need bread.", "Put apples and pears on the list.",
                "We are out of coffee.", "Add rice."]),
    (FLIGHT, ["Book Alice, 34, from Paris to Rome.", "Bob (50) flies Berlin to Oslo.", "Carla, 8, Madrid to Lisbon.",
              "Fly Dan, 41, Tokyo to Seoul.", "Book Eve, 29, London to Dublin."]),
]


@pytest.fixture(scope="module")
def tokenizer(small_backend):
    return small_backend.tokenizer


def accepts(tokenizer, constraint, fmt, text):
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled_grammar(tokenizer, len(tokenizer), grammar_source(constraint, fmt)))
    return matcher.accept_string(text)


@pytest.mark.parametrize("text, ok", [
    ('<tool_call>{"name": "set_alarm", "arguments": {"hour": 7, "enabled": true}}</tool_call>', True),
    ('<tool_call>{"name": "set_alarm", "arguments": {"hour": 7}}</tool_call>', False),  # missing required
    ('<tool_call>{"name": "set_alarm", "arguments": {"hour": "7", "enabled": true}}</tool_call>', False),
    ('<tool_call>{"name": "set_thermostat", "arguments": {"room": "garage", "mode": "heat"}}</tool_call>', False),
    ('<tool_call>{"name": "set_thermostat", "arguments": {"room": "kitchen", "mode": "heat"}}</tool_call>', True),
    ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', False),
    ('Sure! <tool_call>', False),  # required: nothing before the call
])
def test_required_json_call_grammar(tokenizer, text, ok):
    assert accepts(tokenizer, Constraint("tool_call", tools=(ALARM, THERMOSTAT)), "hf", text) is ok


def test_named_tool_excludes_the_others(tokenizer):
    c = Constraint("tool_call", tools=(ALARM, THERMOSTAT), tool_name="set_alarm")
    assert accepts(tokenizer, c, "hf", '<tool_call>{"name": "set_alarm", "arguments": {"hour": 1, "enabled": false}}')
    assert not accepts(tokenizer, c, "hf", '<tool_call>{"name": "set_thermostat"')
    with pytest.raises(RequestError, match="'missing'"):
        grammar_source(Constraint("tool_call", tools=(ALARM,), tool_name="missing"), "hf")


def test_auto_allows_text_then_constrains_the_call(tokenizer):
    c = Constraint("tool_call", tools=(ALARM,), auto=True)
    assert accepts(tokenizer, c, "hf", "I can do that. Here goes:\n")
    assert accepts(tokenizer, c, "hf", 'Ok <tool_call>{"name": "set_alarm", "arguments": {"hour": 3, "enabled": true}}'
                                       '</tool_call> done')
    assert not accepts(tokenizer, c, "hf", 'Ok <tool_call>{"name": "set_alarm", "arguments": {"hour": "3"')


@pytest.mark.parametrize("text, ok", [
    ("set_alarm\n```python\ntool_call(hour=7, enabled=True)\n```", True),
    ("set_alarm\n```python\ntool_call(hour=7, enabled=true)\n```", False),
    ("set_alarm\n```python\ntool_call(enabled=True)\n```", False),
    ("set_thermostat\n```python\ntool_call(room='kitchen', mode='off')\n```", True),
    ("set_thermostat\n```python\ntool_call(room='garage', mode='off')\n```", False),
    ("add_to_shopping_list\n```python\ntool_call(items=['milk', \"eggs\"])\n```", True),
    ("book_flight\n```python\ntool_call(passenger={'name': 'Al', 'age': 3}, route={'from': 'A', 'to': 'B'})\n```",
     True),
    ("book_flight\n```python\ntool_call(passenger={'name': 'Al'}, route={'from': 'A', 'to': 'B'})\n```", False),
    ("transfer_money\n```python\ntool_call(account_id=12, amount=-3.5e2)\n```", True),
])
def test_chatglm3_python_call_grammar(tokenizer, text, ok):
    c = Constraint("tool_call", tools=(ALARM, THERMOSTAT, SHOPPING, FLIGHT, TRANSFER))
    assert accepts(tokenizer, c, "chatglm3", text) is ok
    if ok:  # and whatever the grammar accepts, our parser reads back to schema-valid arguments
        call = parse_chatglm3_turn(text, tools=True).tool_calls[0]
        spec = next(t for t in c.tools if t["function"]["name"] == call.name)
        jsonschema.validate(call.arguments, spec["function"]["parameters"])


def test_chatglm3_optional_parameters_in_any_subset():
    grammar = python_call_grammar([{"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}}}], auto=False)
    assert '"a=" py_int (", " "b=" py_int)?' in grammar and '("b=" py_int)' in grammar


def test_json_modes(tokenizer):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert accepts(tokenizer, Constraint("json_schema", schema=schema), "hf", '{"n": 3}')
    assert not accepts(tokenizer, Constraint("json_schema", schema=schema), "hf", '{"n": 3, "x": 1}')
    assert accepts(tokenizer, Constraint("json_object"), "hf", '{"any": ["thing", 1]}')
    assert not accepts(tokenizer, Constraint("json_object"), "hf", '[1, 2]')


def test_bad_constraints_are_request_errors(tokenizer):
    with pytest.raises(RequestError, match="at least one tool"):
        logits_processor(Constraint("tool_call"), tokenizer, "hf")
    with pytest.raises(RequestError, match="schema object"):
        logits_processor(Constraint("json_schema"), tokenizer, "hf")


def test_tool_call_grammar_bounds_free_strings_and_arrays():
    from chatglm_core.constrain import FREE_STRING_PATTERN, MAX_ARRAY_ITEMS, MAX_STRING_CHARS, bounded

    schema = {"type": "object", "properties": {
        "s": {"type": "string"}, "e": {"type": "string", "enum": ["a"]}, "n": {"type": ["string", "null"]},
        "a": {"type": "array", "items": {"type": "string", "maxLength": 5}}, "k": {"type": "string", "maxLength": 3}}}
    props = bounded(schema)["properties"]
    assert props["s"]["pattern"] == FREE_STRING_PATTERN % (MAX_STRING_CHARS - 1) and "maxLength" not in props["s"]
    assert props["n"]["maxLength"] == MAX_STRING_CHARS
    assert "maxLength" not in props["e"] and props["k"] == {"type": "string", "maxLength": 3}
    assert props["a"]["maxItems"] == MAX_ARRAY_ITEMS and props["a"]["items"] == {"type": "string", "maxLength": 5}


@pytest.mark.parametrize("value, allowed", [
    ("2 + 2", True), ("a < b", True), ("café au lait", True), ("x" * 96, True),
    ("}}</tool_call>", False), ("x</tool_call>", False), ("<tool_call>", False), ("x<tool_call>{", False),
    (" 2 + 2", False), ("]", False), ("", False), ("x" * 97, False)])
def test_free_strings_in_a_call_keep_the_calls_markup_out(value, allowed):
    """The grammar itself (xgrammar's matcher on the call's text) refuses markup inside a free string."""
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    from chatglm_core.constrain import json_call_tag

    calc = tool("calculator", {"expression": {"type": "string"}}, ["expression"])
    grammar = xgr.Grammar.from_structural_tag(json_call_tag([calc["function"]], auto=False))
    arguments = json.dumps({"expression": value}, ensure_ascii=False)
    text = '<tool_call>{"name": "calculator", "arguments": ' + arguments + "}</tool_call>"
    assert _is_grammar_accept_string(grammar, text) is allowed


def test_compiled_grammars_are_cached(tokenizer):
    source = grammar_source(Constraint("tool_call", tools=(FLIGHT, SHOPPING, ALARM)), "hf")
    start = time.perf_counter()
    first = compiled_grammar(tokenizer, len(tokenizer), source)
    assert compiled_grammar(tokenizer, len(tokenizer), source) is first
    assert compiled_grammar(tokenizer, len(tokenizer) + 64, source) is not first  # padded logits: own grammar
    print(f"\ncompile + cache hit: {time.perf_counter() - start:.3f} s")


# --- the real model ------------------------------------------------------------------------
def sample_batch(engine, spec, prompts, *, constrained, max_new_tokens=96, seed=0):
    """Sampled replies to the prompts, generated concurrently (the engine batches them)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i_prompt):
        i, prompt = i_prompt
        constraint = Constraint("tool_call", tools=(spec,)) if constrained else None
        options = GenerationOptions(temperature=0.7, top_p=0.9, repetition_penalty=1.05, seed=seed + i,
                                    max_new_tokens=max_new_tokens, constraint=constraint)
        done = engine.complete([Message(Role.USER, prompt)], options, tools=[spec])
        # (text, finished): finished = the model reached a stop instead of running out of budget
        return done.raw_text, done.finish_reason != "length"

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, enumerate(prompts)))


def valid_call(backend, text, spec):
    try:
        calls = backend.format.parse(text, tools=True).tool_calls
    except ParseError:
        return None
    if len(calls) != 1 or calls[0].name != spec["function"]["name"]:
        return None
    validator = jsonschema.Draft202012Validator(spec["function"]["parameters"])
    return calls[0].arguments if validator.is_valid(calls[0].arguments) else None


@pytest.mark.slow  # ~2000 sampled tokens: minutes on 2 cores; `make test` keeps the engine-level checks below
@pytest.mark.parametrize("per_schema", [2, None])
def test_forced_calls_are_always_schema_valid_with_sampling(small_engine, small_backend, per_schema):
    """Every constrained reply that ends is a schema-valid call. A reply can still be cut off by
    max_new_tokens while the model loops inside a (bounded) string; that is counted, not hidden.
    `make soak` runs it with 2 prompts per schema and with all of them."""
    counts = {True: [0, 0, 0], False: [0, 0, 0]}  # valid, cut off, total
    for spec, prompts in CASES:
        prompts = prompts[:per_schema]
        for constrained in (True, False):
            replies = sample_batch(small_engine, spec, prompts, constrained=constrained,
                                   max_new_tokens=128 if spec in (FLIGHT, SHOPPING) else 96)
            for text, finished in replies:
                valid = valid_call(small_backend, text, spec) is not None
                counts[constrained][0] += valid
                counts[constrained][1] += not finished
                counts[constrained][2] += 1
                if constrained:
                    assert valid or not finished, f"{spec['function']['name']}: malformed constrained reply {text!r}"
    print("\nschema-valid calls: " + ", ".join(
        f"{'constrained' if c else 'unconstrained'} {ok}/{n} ({cut} cut off by max_new_tokens)"
        for c, (ok, cut, n) in sorted(counts.items(), reverse=True)))
    ok, _, n = counts[True]
    assert ok >= 0.9 * n, f"only {ok}/{n} constrained replies were complete, valid calls"
    assert counts[False][0] < ok  # the baseline: the model rarely writes the call form on its own


def test_backend_applies_the_constraint_through_the_engine(small_engine):
    """The real backend's token loop with a named tool among several: a valid call of that tool."""
    done = small_engine.complete(
        [Message(Role.USER, "Book a flight for Alice, 34, from Paris to Rome.")],
        GenerationOptions(max_new_tokens=96, temperature=0.7, seed=3,
                          constraint=Constraint("tool_call", tools=(ALARM, FLIGHT), tool_name="book_flight")),
        tools=[ALARM, FLIGHT])
    assert done.parse_error is None and done.finish_reason == "tool_calls"
    call = done.message.tool_calls[0]
    assert call.name == "book_flight"
    jsonschema.validate(call.arguments, FLIGHT["function"]["parameters"])


def test_json_schema_reply_through_the_engine(small_engine):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                "population": {"type": "integer"}},
              "required": ["city", "population"]}
    done = small_engine.complete([Message(Role.USER, "Give the largest city of France and its population as JSON.")],
                                 GenerationOptions(max_new_tokens=48, temperature=0,
                                                   constraint=Constraint("json_schema", schema=schema)))
    jsonschema.validate(json.loads(done.message.content), schema)


def test_a_forced_calculator_call_can_only_write_an_expression():
    """The built-in calculator hints its expression's shape to the grammar (`x-grammar-pattern`),
    while the schema check leaves wrong expressions to the calculator's own advice."""
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    from chatglm_core.constrain import json_call_tag
    from tools.builtins import register_builtins
    from tools.registry import ToolRegistry

    registry = ToolRegistry()
    register_builtins(registry)
    grammar = xgr.Grammar.from_structural_tag(json_call_tag([registry.get("calculator").spec()["function"]],
                                                            auto=False))

    def accepts(expression):
        arguments = json.dumps({"expression": expression})
        return _is_grammar_accept_string(grammar, '<tool_call>{"name": "calculator", "arguments": ' + arguments
                                         + "}</tool_call>")

    assert all(map(accepts, ["17*23", "(3 + 4) * 5", "sqrt(144)", "-7 + 2**10", "0.15 * 240"]))
    assert not any(map(accepts, ["{6} * {9}", "= 240", ".5", "The result is 12", "2 ^ 3"]))
    assert "write 2 ** 10" in registry.dispatch("calculator", {"expression": "2 ^ 3"}).content
