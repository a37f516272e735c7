"""The tool loop, driven by a scripted backend: rounds, manual tools, limits, bad calls, code."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
from conftest import ScriptedBackend

from chatglm_core.agent import INVALID_CALL, run_agent
from chatglm_core.engine import Engine
from chatglm_core.errors import ParseError, RequestError
from chatglm_core.messages import (
    INTERPRETER,
    Done,
    Message,
    NeedObservation,
    Role,
    TextDelta,
    ToolCallEvent,
    ToolResultEvent,
    Usage,
)
from tools.builtins import register_builtins
from tools.registry import ToolRegistry
from tools.yaml_tools import BUNDLED


class Recording(ScriptedBackend):
    """Records options and tools per call; a malformed call becomes Done.parse_error, as in the real backend."""

    def __init__(self) -> None:
        super().__init__()
        self.options, self.tools, self.interpreter = [], [], []

    def stream(self, messages, options, *, tools=None, interpreter=False, cancel=None):
        self.options.append(options)
        self.tools.append(tools)
        self.interpreter.append(interpreter)
        text = self.replies[0] if self.replies else ""
        try:
            yield from super().stream(messages, options, tools=tools, interpreter=interpreter, cancel=cancel)
        except ParseError as e:
            yield Done(Message(Role.ASSISTANT, text.strip()), "stop", Usage(), raw_text=text, parse_error=str(e))


def call(name: str, args: str) -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {args}}}</tool_call>'


@pytest.fixture
def backend():
    return Recording()


@pytest.fixture
def registry():
    reg = ToolRegistry(timeout=5)
    register_builtins(reg)
    reg.load_yaml(BUNDLED)  # convert_units (python) and ask_colleague (manual)
    return reg


def run(backend, registry, messages=None, **kw):
    messages = messages or [Message(Role.USER, "go")]
    return list(run_agent(Engine(backend), messages, registry=registry, **kw))


def kinds(events):
    return [type(e).__name__ for e in events if not isinstance(e, TextDelta)]


def test_several_rounds_then_an_answer(backend, registry):
    backend.enqueue(call("calculator", '{"expression": "6 * 7"}'),
                    call("convert_units", '{"value": 42, "from_unit": "km", "to_unit": "m"}'),
                    "The answer is 42000 metres.")
    events = run(backend, registry)
    assert kinds(events) == ["Done", "ToolCallEvent", "ToolResultEvent", "Done", "ToolCallEvent", "ToolResultEvent",
                             "Done"]
    results = [e for e in events if isinstance(e, ToolResultEvent)]
    assert results[0].message.content == "42" and results[0].ok
    assert results[1].message.content == '{"value": 42000.0, "unit": "m"}'
    first_call = events[[type(e) for e in events].index(Done)].message.tool_calls[0]
    assert results[0].message.tool_call_id == first_call.id and results[0].message.name == "calculator"
    final = events[-1]
    assert isinstance(final, Done) and final.message.content == "The answer is 42000 metres."
    # the third generation saw both calls and both results
    seen = backend.calls[2]
    assert [m.role for m in seen] == [Role.USER, Role.ASSISTANT, Role.TOOL, Role.ASSISTANT, Role.TOOL]
    assert seen[2].content == "42"
    # auto: every generation had the tools and an auto constraint
    assert all(o.constraint.kind == "tool_call" and o.constraint.auto for o in backend.options)
    assert {t["function"]["name"] for t in backend.tools[0]} >= {"calculator", "ask_colleague"}


def test_tool_failures_are_fed_back_and_the_loop_goes_on(backend, registry):
    backend.enqueue(call("calculator", '{"expression": "1/0"}'), call("nope", "{}"), "Sorry.")
    results = [e for e in run(backend, registry) if isinstance(e, ToolResultEvent)]
    assert [r.ok for r in results] == [False, False]
    assert results[0].message.content == "Error: division by zero"
    assert "unknown tool 'nope'" in results[1].message.content and "calculator" in results[1].message.content


@pytest.mark.parametrize("choice, first", [
    ("required", {"auto": False, "tool_name": None}),
    ({"name": "calculator"}, {"auto": False, "tool_name": "calculator"}),
    ({"type": "function", "function": {"name": "calculator"}}, {"auto": False, "tool_name": "calculator"}),
])
def test_forced_tool_choice_applies_to_the_first_generation(backend, registry, choice, first):
    backend.enqueue(call("calculator", '{"expression": "2+2"}'), "4")
    run(backend, registry, tool_choice=choice)
    c0, c1 = backend.options[0].constraint, backend.options[1].constraint
    assert (c0.auto, c0.tool_name) == (first["auto"], first["tool_name"])
    assert len(c0.tools) == len(registry.get_tools())
    assert c1.auto and c1.tool_name is None


def test_tool_choice_none_offers_no_tools(backend, registry):
    backend.enqueue("Just text.")
    events = run(backend, registry, tool_choice="none")
    assert backend.tools == [None] and backend.options[0].constraint is None
    assert events[-1].message.content == "Just text."


@pytest.mark.parametrize("choice, message", [
    ({"name": "zzz"}, "names 'zzz'"),
    ("sometimes", "tool_choice must be"),
])
def test_bad_tool_choice_is_a_request_error(backend, registry, choice, message):
    with pytest.raises(RequestError, match=message):
        run(backend, registry, tool_choice=choice)


def test_disabled_tools_are_not_offered_nor_forced(backend, registry):
    registry.set_enabled("calculator", False)
    with pytest.raises(RequestError, match="not an enabled tool"):
        run(backend, registry, tool_choice={"name": "calculator"})


def test_manual_tool_stops_and_resumes(backend, registry):
    backend.enqueue(call("calculator", '{"expression": "1+1"}') + call("ask_colleague", '{"question": "lunch?"}'))
    history = [Message(Role.USER, "go")]
    events = run(backend, registry, history, max_rounds=2)
    assert kinds(events) == ["Done", "ToolCallEvent", "ToolResultEvent", "NeedObservation"]
    need = events[-1]
    assert isinstance(need, NeedObservation) and need.call.arguments == {"question": "lunch?"}
    history += [e.message for e in events if isinstance(e, (Done, ToolResultEvent))]
    history.append(Message(Role.TOOL, "Pizza at noon.", tool_call_id=need.call.id, name="ask_colleague"))
    backend.enqueue(call("calculator", '{"expression": "2+2"}'), "We eat pizza at noon.")
    resumed = run(backend, registry, history, max_rounds=2)
    assert backend.calls[1][-1].content == "Pizza at noon."
    # the resumed turn already used one round: the second call is the last one allowed
    assert kinds(resumed) == ["Done", "ToolCallEvent", "ToolResultEvent", "Done"]
    assert resumed[-1].message.content == "We eat pizza at noon."


@pytest.mark.parametrize("choice", ["required", {"name": "ask_colleague"}])
def test_a_turn_resumed_after_a_manual_observation_is_not_forced_again(backend, registry, choice):
    backend.enqueue(call("ask_colleague", '{"question": "when is the meeting?"}'))
    history = [Message(Role.USER, "Ask my colleague what time the meeting is")]
    events = run(backend, registry, history, tool_choice=choice)
    need = events[-1]
    assert isinstance(need, NeedObservation) and not backend.options[0].constraint.auto
    history += [e.message for e in events if isinstance(e, Done)]
    history.append(Message(Role.TOOL, "At 3 pm.", tool_call_id=need.call.id, name="ask_colleague"))
    backend.enqueue("The meeting is at 3 pm.")
    resumed = run(backend, registry, history, tool_choice=choice)
    resumed_constraint = backend.options[1].constraint
    assert resumed_constraint.auto and resumed_constraint.tool_name is None  # the model may answer now
    assert resumed[-1].message.content == "The meeting is at 3 pm."


def test_round_limit_stops_with_a_note(backend, registry):
    backend.enqueue(*[call("calculator", f'{{"expression": "{i}+1"}}') for i in range(3)])
    events = run(backend, registry, max_rounds=2)
    assert kinds(events) == ["Done", "ToolCallEvent", "ToolResultEvent"] * 2 + ["Done"]
    last = events[-1]
    assert last.finish_reason == "max_rounds" and not last.message.tool_calls
    assert "limit is 2 rounds" in last.message.content
    assert any(isinstance(e, TextDelta) and "Stopped" in e.text for e in events)
    assert not backend.replies  # three generations, two executed


def test_malformed_call_becomes_an_observation_and_counts_as_a_round(backend, registry):
    backend.enqueue('<tool_call>{"name": "calculator", "arguments": {"expression": </tool_call>',
                    call("calculator", '{"expression": "3*3"}'), "Nine.")
    events = run(backend, registry)
    feedback = next(e for e in events if isinstance(e, ToolResultEvent))
    assert feedback.call.name == INVALID_CALL and not feedback.ok
    assert feedback.message.role is Role.TOOL and "could not be parsed" in feedback.message.content
    assert "not valid JSON" in feedback.message.content
    assert backend.calls[1][-1] is feedback.message
    assert events[-1].message.content == "Nine."
    backend.enqueue('<tool_call>{"name": </tool_call>', "x")
    limited = run(backend, registry, max_rounds=0)
    assert limited[-1].finish_reason == "max_rounds"


@dataclass
class FakeExec:
    status: str
    text: str = ""
    images: list = field(default_factory=list)
    error: str | None = None


class FakeSandbox:
    def __init__(self, *results):
        self.results = list(results)
        self.codes = []

    def run(self, code, timeout=None):
        self.codes.append(code)
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


def test_interpreter_calls_run_in_the_sandbox(backend, registry):
    png = b"\x89PNG fake"
    sandbox = FakeSandbox(FakeExec("ok", "42\n", [png, png]), FakeExec("error", "", error="NameError: x"),
                          FakeExec("timeout"), RuntimeError("kernel gone"))
    backend.enqueue("Let me compute.\n```python\nprint(6*7)\n```", "```python\nx\n```", "```python\nwhile 1: pass\n```",
                    "```python\n1\n```", "Done.")
    events = run(backend, registry, sandbox=sandbox)
    assert backend.interpreter[0] is True
    assert sandbox.codes == ["print(6*7)", "x", "while 1: pass", "1"]
    calls = [e.call for e in events if isinstance(e, ToolCallEvent)]
    assert all(c.name == INTERPRETER for c in calls)
    results = [e for e in events if isinstance(e, ToolResultEvent)]
    assert results[0].message.content == "42\n[Image]\n[Image]" and results[0].message.images == [png, png]
    assert results[0].ok and results[0].message.name == INTERPRETER
    assert results[1].message.content == "NameError: x" and not results[1].ok
    assert "ran too long" in results[2].message.content
    assert results[3].message.content == "Error: tool 'interpreter' raised RuntimeError: kernel gone"
    assert events[-1].message.content == "Done."


def test_an_unset_cancel_event_lets_every_round_run(backend, registry):
    backend.enqueue(call("calculator", '{"expression": "1+1"}'), call("calculator", '{"expression": "2+2"}'), "4.")
    events = run(backend, registry, cancel=threading.Event())
    assert kinds(events) == ["Done", "ToolCallEvent", "ToolResultEvent"] * 2 + ["Done"]
    assert events[-1].message.content == "4."


def test_cancel_ends_the_loop(backend, registry):
    cancel = threading.Event()
    backend.enqueue(call("calculator", '{"expression": "1"}'), "never")
    events = []
    for ev in run_agent(Engine(backend), [Message(Role.USER, "go")], registry=registry, cancel=cancel):
        events.append(ev)
        cancel.set()
    assert isinstance(events[-1], Done)
    assert not any(isinstance(e, ToolCallEvent) for e in events)
    assert len(backend.calls) == 1 and backend.replies == ["never"]


class CutOff(Recording):
    """Its replies run out of tokens: finish_reason "length", as the real backend reports a cut call."""

    def stream(self, messages, options, *, tools=None, interpreter=False, cancel=None):
        for ev in super().stream(messages, options, tools=tools, interpreter=interpreter, cancel=cancel):
            yield Done(ev.message, "length", ev.usage, raw_text=ev.raw_text, parse_error=ev.parse_error) \
                if isinstance(ev, Done) else ev


def test_a_call_cut_off_by_the_token_limit_ends_the_turn_without_its_markup(registry):
    backend = CutOff().enqueue('Let me compute. <tool_call>{"name": "calculator", "arguments": {"expr')
    events = run(backend, registry, tool_choice="required")
    assert kinds(events) == ["Done"] and len(backend.calls) == 1  # no retry that would be cut off again
    final = events[-1]
    assert final.finish_reason == "length" and "<tool_call>" not in final.message.content
    assert final.message.content.startswith("Let me compute.\n[Stopped: the tool call was cut off")
