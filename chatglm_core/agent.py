"""The tool loop: generate, run the calls the model makes, feed the results back, repeat.

`run_agent` drives an Engine and yields the same events every adapter renders: the model's
TextDeltas and Done for each generation, then a ToolCallEvent / ToolResultEvent per call. The
caller's history is `messages` + each Done.message + each ToolResultEvent.message, in order.
Manual tools stop the loop with NeedObservation: the caller appends the user's TOOL message and
calls run_agent again. Code-interpreter calls run in the sandbox the caller passes (any object
with `run(code) -> ExecResult`). Tool failures are results the model reads, never exceptions.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from chatglm_core.backends.base import Constraint, GenerationOptions
from chatglm_core.context import cap_result
from chatglm_core.engine import Engine
from chatglm_core.errors import RequestError
from chatglm_core.formats.parsing import TOOL_CALL_OPEN
from chatglm_core.messages import (
    INTERPRETER,
    Done,
    Event,
    Message,
    NeedObservation,
    Role,
    TextDelta,
    ToolCall,
    ToolCallEvent,
    ToolResultEvent,
)
from chatglm_core.sampling import options_for
from tools.registry import ToolRegistry, ToolResult, call_guarded

#: ToolCall name used for the observation that answers a malformed call.
INVALID_CALL = "invalid_tool_call"


class SandboxLike(Protocol):
    def run(self, code: str, timeout: float | None = None) -> Any: ...


def run_agent(
    engine: Engine,
    messages: list[Message],
    *,
    registry: ToolRegistry,
    options: GenerationOptions | None = None,
    tool_choice: str | dict[str, Any] = "auto",
    sandbox: SandboxLike | None = None,
    max_rounds: int = 5,
    cancel: threading.Event | None = None,
    fit_context: bool = False,
) -> Iterator[Event]:
    """Events of one user turn, through at most `max_rounds` rounds of tool calls.

    tool_choice: "auto" (the model decides), "none" (no tools offered), "required" (the first
    reply must be a call) or {"name": tool} / {"function": {"name": tool}} (a call of that tool).
    Forcing applies to the first generation of a turn only; later rounds are "auto", so the model
    can answer with the results. A turn resumed after a manual observation is a later round too:
    forcing it again would make the model call the same tool until the round limit. A malformed
    call is answered with an observation saying what was wrong, and counts as a round. fit_context:
    each generation sees the conversation fitted to the context window (`Engine.stream`'s
    ContextTrimmed events are passed on). Every tool result is capped at a share of the context
    window, in tokens (`chatglm_core.context.cap_result`).
    """
    options = options or options_for(engine.backend)
    tools = registry.get_tools() if tool_choice != "none" else []
    first = _constraint(tool_choice, tools)
    later = Constraint("tool_call", tools=tuple(tools), auto=True) if tools else None
    convo = list(messages)
    rounds = _rounds_used(convo)
    constraint = first if rounds == 0 else later
    while True:
        opts = dataclasses.replace(options, constraint=constraint) if tools else options
        constraint = later
        if cancel is not None and cancel.is_set():
            return
        # Engine.stream sets the event it is given when a generation ends, so each generation gets
        # its own, and the caller's `cancel` is relayed to it as events arrive.
        generation = threading.Event()
        done = None
        for ev in engine.stream(convo, opts, tools=tools or None, interpreter=sandbox is not None, cancel=generation,
                                fit_context=fit_context):
            if cancel is not None and cancel.is_set():
                generation.set()
            if isinstance(ev, Done):
                done = ev
            else:
                yield ev
        assert done is not None, "engine ended without a Done event"
        calls = done.message.tool_calls
        cancelled = done.finish_reason == "cancelled" or (cancel is not None and cancel.is_set())
        if cancelled or not (calls or done.parse_error):
            yield done
            return
        if not calls and done.finish_reason == "length":  # a call cut off: a retry would be cut off too
            yield from _cut_call(done)
            return
        if rounds >= max_rounds:
            yield from _round_limit(done, max_rounds)
            return
        yield done
        convo.append(done.message)
        rounds += 1
        if not calls:  # a malformed call: tell the model what was wrong and let it retry
            feedback = Message(Role.TOOL, f"Error: your tool call could not be parsed: {done.parse_error}. "
                                          "Call a tool again with valid syntax, or answer in plain text.")
            convo.append(feedback)
            yield ToolResultEvent(ToolCall(INVALID_CALL, {}), feedback, ok=False)
            continue
        manual = []
        for call in calls:
            if cancel is not None and cancel.is_set():
                return
            tool = registry.get(call.name)
            if tool is not None and tool.manual and registry.is_enabled(call.name):
                manual.append(call)
                continue
            yield ToolCallEvent(call)
            result = _run_call(call, registry, sandbox)
            reply = Message(Role.TOOL, cap_result(result.content, engine.backend), tool_call_id=call.id,
                            name=call.name, images=result.images)
            convo.append(reply)
            yield ToolResultEvent(call, reply, result.ok)
        if manual:
            for call in manual:
                yield NeedObservation(call)
            return


def _constraint(tool_choice: str | dict[str, Any], tools: list[dict[str, Any]]) -> Constraint | None:
    if tool_choice == "none" or not tools:
        if tool_choice not in ("none", "auto"):
            raise RequestError("tool_choice asks for a tool call but no tools are enabled", param="tool_choice")
        return None
    if tool_choice == "auto":
        return Constraint("tool_call", tools=tuple(tools), auto=True)
    if tool_choice == "required":
        return Constraint("tool_call", tools=tuple(tools), auto=False)
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or tool_choice).get("name")
        names = [t["function"]["name"] for t in tools]
        if name not in names:
            raise RequestError(f"tool_choice names {name!r}, which is not an enabled tool; enabled: "
                               f"{', '.join(names)}", param="tool_choice")
        return Constraint("tool_call", tools=tuple(tools), tool_name=name)
    raise RequestError(f"tool_choice must be 'auto', 'none', 'required' or {{'name': ...}}, got {tool_choice!r}",
                       param="tool_choice")


def _rounds_used(convo: list[Message]) -> int:
    """Tool rounds since the last user message (a resumed manual turn keeps counting)."""
    rounds = 0
    for i in range(len(convo) - 1, -1, -1):
        if convo[i].role is Role.USER:
            break
        if convo[i].role is Role.ASSISTANT and i + 1 < len(convo) and convo[i + 1].role is Role.TOOL:
            rounds += 1
    return rounds


def _round_limit(done: Done, max_rounds: int) -> Iterator[Event]:
    """End the turn without running the calls: they would exceed the round limit."""
    note = (f"[Stopped: the model kept calling tools; the limit is {max_rounds} rounds per message. "
            "Ask again or rephrase to continue.]")
    yield TextDelta("\n" + note)
    message = Message(Role.ASSISTANT, f"{done.message.content}\n{note}".strip())
    yield Done(message, "max_rounds", done.usage, raw_text=done.raw_text)


def _cut_call(done: Done) -> Iterator[Event]:
    """End the turn on a call cut off by the token limit: the text before it and a note, never the
    half call's markup as if the model had meant it as text."""
    raw = done.raw_text or done.message.content
    head = raw.split(TOOL_CALL_OPEN, 1)[0].strip() if TOOL_CALL_OPEN in raw else ""
    note = "[Stopped: the tool call was cut off by the max new tokens limit. Raise it and ask again.]"
    yield TextDelta("\n" + note)
    yield Done(Message(Role.ASSISTANT, f"{head}\n{note}".strip()), "length", done.usage, raw_text=done.raw_text,
               parse_error=done.parse_error)


def _run_call(call: ToolCall, registry: ToolRegistry, sandbox: SandboxLike | None) -> ToolResult:
    if call.name != INTERPRETER:
        return registry.dispatch(call.name, call.arguments)
    if sandbox is None:
        return ToolResult("Error: the code interpreter is not enabled in this conversation.", ok=False)
    # the sandbox enforces its own time limit, so no extra thread here
    return registry.finish(call_guarded(lambda: exec_result_text(sandbox.run(call.code)), None, INTERPRETER))


def exec_result_text(result: Any) -> ToolResult:
    """An ExecResult (status, text, images, error) as the observation the model reads."""
    parts = [result.text.rstrip()] if result.text and result.text.strip() else []
    if result.status == "error" and result.error and result.error not in (result.text or ""):
        parts.append(result.error.rstrip())
    elif result.status == "timeout":
        parts.append(f"Error: the code ran too long and was stopped. {result.error or ''}".rstrip())
    elif result.status == "died":
        parts.append(f"Error: the Python kernel died and was restarted; variables are lost. {result.error or ''}".rstrip())
    parts += ["[Image]"] * len(result.images)
    text = "\n".join(parts) or "(no output)"
    return ToolResult(text, ok=result.status == "ok", images=list(result.images))
