"""/v1/chat/completions: an OpenAI request → engine calls → an OpenAI response or SSE stream.

`plan_chat` is the whole translation (messages, options, tools, constraint) and raises
`RequestError` for anything the schema can't catch. `complete` and `stream_events` run the plan;
both go through `EngineRun`, so the event loop never blocks on the model.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import jsonschema
from starlette.requests import Request

from chatglm_core import sampling
from chatglm_core.api.bridge import EngineRun
from chatglm_core.api.schemas import SEED_MAX, ChatCompletionRequest, ChatMessage, NamedToolChoice
from chatglm_core.backends.base import Constraint, GenerationOptions
from chatglm_core.engine import Engine, validate_messages
from chatglm_core.errors import RequestError
from chatglm_core.formats.parsing import TOOL_CALL_OPEN
from chatglm_core.messages import Done, Message, Role, TextDelta, ToolCall, Usage
from chatglm_core.settings import Settings

GREEDY_BELOW = 1e-4  # smaller temperatures overflow the logits; they mean "greedy" anyway


@dataclass
class ChatPlan:
    messages: list[Message]
    options: list[GenerationOptions]  # one per choice (n)
    tools: list[dict[str, Any]] | None
    legacy: bool  # the request used `functions`: answer with `function_call`
    include_usage: bool


# --- request → plan ----------------------------------------------------------------------------
def plan_chat(req: ChatCompletionRequest, settings: Settings, backend: Any) -> ChatPlan:
    if req.logprobs:
        raise RequestError("logprobs are not supported by this server: drop 'logprobs'", param="logprobs")
    tools, choice, legacy = _tools_and_choice(req)
    messages = to_messages(req.messages)
    validate_messages(messages)
    base = _options(req, settings, backend)
    base.constraint = _constraint(req, tools, choice)
    if _structured(base.constraint) and req.repetition_penalty is None \
            and "repetition_penalty" not in sampling.of(backend, settings).from_model:
        base.repetition_penalty = 1.0  # a penalty on JSON's repeated quotes and keys makes greedy JSON ramble
    options = []
    for i in range(req.n):
        opt = dataclasses.replace(base)
        if base.seed is not None and i:
            opt.seed = base.seed + i if base.seed + i <= SEED_MAX else base.seed - i
        options.append(opt)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ChatPlan(messages, options, tools if choice != "none" else None, legacy, include_usage)


def to_messages(raw: list[ChatMessage]) -> list[Message]:
    out = []
    for i, m in enumerate(raw):
        data = m.model_dump(exclude_none=True)
        if data["role"] == "developer":  # newer clients' name for the system role
            data["role"] = "system"
        try:
            out.append(Message.from_openai(data))
        except RequestError as e:
            raise RequestError(f"messages[{i}]: {e}", param=f"messages[{i}]") from None
    return out


def _tools_and_choice(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, Any, bool]:
    if req.functions is not None and req.tools is not None:
        raise RequestError("send either 'tools' or the legacy 'functions', not both", param="functions")
    if req.function_call is not None and req.functions is None:
        raise RequestError("'function_call' needs 'functions'", param="function_call")
    legacy = req.functions is not None
    if legacy:
        tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in req.functions or []]
        fc = req.function_call
        choice: Any = fc if isinstance(fc, str) else (fc.name if fc is not None else None)
    else:
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        tc = req.tool_choice
        choice = tc.function.name if isinstance(tc, NamedToolChoice) else tc
    param = "functions" if legacy else "tools"
    _validate_tools(tools, param)
    if not tools:
        if choice not in (None, "none", "auto"):
            raise RequestError(f"tool_choice {choice!r} needs at least one tool in '{param}'", param="tool_choice")
        return None, "none", legacy
    if choice not in (None, "none", "auto", "required") and choice not in {t["function"]["name"] for t in tools}:
        raise RequestError(f"tool_choice names {choice!r}, which is not one of the tools given", param="tool_choice")
    return tools, choice or "auto", legacy


def _validate_tools(tools: list[dict[str, Any]], param: str) -> None:
    names: set[str] = set()
    for i, tool in enumerate(tools):
        fn = tool["function"]
        where = f"{param}[{i}]" if param == "functions" else f"{param}[{i}].function"
        if fn["name"] in names:
            raise RequestError(f"two tools are named {fn['name']!r}: tool names must be unique", param=f"{where}.name")
        names.add(fn["name"])
        params = fn.get("parameters")
        if params is None:
            continue
        check_schema(params, f"{where}.parameters", "function parameters")
        if params.get("type") != "object":
            raise RequestError(f"{where}.parameters must be a JSON Schema with \"type\": \"object\"",
                               param=f"{where}.parameters", code="invalid_function_parameters")


def check_schema(schema: dict[str, Any], param: str, what: str) -> None:
    """Validate a JSON Schema against its meta-schema; RequestError naming `param` if it isn't one."""
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "".join(f"[{p!r}]" for p in e.absolute_path)
        raise RequestError(f"{param} is not a valid JSON Schema for {what}: {e.message} (at {path or 'the root'})",
                           param=param, code="invalid_schema") from None
    except (RecursionError, ValueError, TypeError) as e:
        raise RequestError(f"{param} is not a valid JSON Schema for {what}: {e}", param=param,
                           code="invalid_schema") from None


def _options(req: ChatCompletionRequest, settings: Settings, backend: Any) -> GenerationOptions:
    """The request's values; what it leaves out comes from the backend's sampling defaults (yours, else
    the model's recommendation, else ours: `chatglm_core.sampling`), as vLLM applies a model's
    generation_config, and as the app does."""
    context_window = backend.context_window
    d = sampling.of(backend, settings)
    max_new = req.max_completion_tokens or req.max_tokens or settings.max_new_tokens
    if context_window and max_new > context_window:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise RequestError(f"{param} is too large: {max_new}. This model's context window is {context_window} tokens "
                           "(prompt and reply together)", param=param)
    if context_window:
        max_new = min(max_new, context_window)
    temperature = d.temperature if req.temperature is None else req.temperature
    # The same repetition penalty as the app (the model's own, else ours, 1.05), not OpenAI's 1.0: on the
    # embedded SmolLM2 via llama.cpp, requests without sampling options said "Paris" 64/90 times at 1.0
    # and 75/90 at 1.05 (benchmarks/bench_api_defaults.py). Structured replies keep 1.0 (plan_chat).
    penalty = d.repetition_penalty
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return GenerationOptions(
        max_new_tokens=max_new,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=d.top_p if req.top_p is None else req.top_p,
        top_k=d.top_k if req.top_k is None else req.top_k,
        repetition_penalty=penalty if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        stop=[s for s in stop if s],
        seed=req.seed,
    )


def _structured(constraint: Constraint | None) -> bool:
    """JSON mode or a forced call: the whole reply is structure (an `auto` tool call is mostly text)."""
    return constraint is not None and not constraint.auto


def _constraint(req: ChatCompletionRequest, tools: list[dict[str, Any]] | None, choice: Any) -> Constraint | None:
    fmt = req.response_format
    wants_json = fmt is not None and fmt.type != "text"
    if tools and choice != "none":
        if wants_json:
            raise RequestError("response_format json_object/json_schema can't be combined with tools unless "
                               "tool_choice is 'none'", param="response_format")
        if choice == "auto":
            return Constraint("tool_call", tools=tuple(tools), auto=True)
        if choice == "required":
            return Constraint("tool_call", tools=tuple(tools))
        return Constraint("tool_call", tools=tuple(tools), tool_name=choice)
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint("json_object")
    schema = fmt.json_schema.schema_
    if schema is None:
        return Constraint("json_object")
    check_schema(schema, "response_format.json_schema.schema", "the response")
    return Constraint("json_schema", schema=schema)


# --- running the plan -------------------------------------------------------------------------
async def complete(engine: Engine, plan: ChatPlan, model: str, request: Request) -> dict[str, Any]:
    """The whole (non-streaming) chat.completion object."""
    choices, usage = [], Usage()
    for i, opts in enumerate(plan.options):
        run = EngineRun(engine, plan.messages, opts, plan.tools)
        try:
            done = None
            while (ev := await run.next(request)) is not None:
                if isinstance(ev, Done):
                    done = ev
        finally:
            run.close()
        assert done is not None, "generation ended without a Done event"
        choices.append(_choice(i, clean_done(done, plan.tools), plan.legacy))
        usage.prompt_tokens = done.usage.prompt_tokens
        usage.completion_tokens += done.usage.completion_tokens
        if i == 0:  # the prompt as it arrived; later choices find it cached by the first
            usage.cached_tokens = done.usage.cached_tokens
    return {"id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_json(usage)}


def clean_done(done: Done, tools: list[dict[str, Any]] | None) -> Done:
    """The Done a client may see: no forged calls, no half call as text."""
    return without_cut_call(only_declared_calls(done, tools), tools)


def without_cut_call(done: Done, tools: list[dict[str, Any]] | None) -> Done:
    """A call cut off by max_tokens is not text the model meant for the reader: as OpenAI does, the
    reply ends with finish_reason "length" and no half call, keeping only the text before the call
    (ChatGLM3's form has no text before a call)."""
    if not tools or done.finish_reason != "length" or not done.parse_error:
        return done
    raw = done.raw_text or done.message.content
    head = raw.split(TOOL_CALL_OPEN, 1)[0].strip() if TOOL_CALL_OPEN in raw else ""
    return dataclasses.replace(done, message=Message(Role.ASSISTANT, head))


def only_declared_calls(done: Done, tools: list[dict[str, Any]] | None) -> Done:
    """A call to a tool the request didn't declare is text the model wrote, not a call: a model
    repeating a user's `<tool_call>{"name": ...}` must not hand the client a forged call."""
    declared = {t["function"]["name"] for t in tools or []}
    undeclared = [c.name for c in done.message.tool_calls if c.name not in declared]
    if not undeclared:
        return done
    text = done.raw_text.strip() or done.message.content
    return dataclasses.replace(done, message=Message(Role.ASSISTANT, text),
                               finish_reason="length" if done.finish_reason == "length" else "stop",
                               parse_error=f"call to {undeclared[0]!r}, which is not one of the request's tools")


def _choice(index: int, done: Done, legacy: bool) -> dict[str, Any]:
    cut = done.finish_reason == "length" and done.parse_error  # a call cut short: no text to show
    message: dict[str, Any] = {"role": "assistant", "content": done.message.content or (None if cut else "")}
    finish = _finish(done, legacy)
    calls = done.message.tool_calls
    if calls and legacy:
        message["function_call"] = _function_json(calls[0])
        message["content"] = done.message.content or None
    elif calls:
        message["tool_calls"] = [_tool_call_json(c) for c in calls]
        message["content"] = done.message.content or None
    return {"index": index, "message": message, "finish_reason": finish, "logprobs": None}


def _finish(done: Done, legacy: bool) -> str:
    if done.message.tool_calls:
        return "function_call" if legacy else "tool_calls"
    return "length" if done.finish_reason == "length" else "stop"


def _function_json(call: ToolCall) -> dict[str, str]:
    return {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}


def _tool_call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": _function_json(call)}


def usage_json(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


# --- streaming ----------------------------------------------------------------------------
async def first_run(engine: Engine, plan: ChatPlan, request: Request) -> tuple[EngineRun, TextDelta | Done | None]:
    """Start the first choice and wait for its first event, so errors (context length…) are 4xx."""
    run = EngineRun(engine, plan.messages, plan.options[0], plan.tools)
    try:
        return run, await run.next(request)
    except BaseException:
        run.close()
        raise


async def stream_events(engine: Engine, plan: ChatPlan, model: str, run: EngineRun,
                        first: TextDelta | Done | None) -> AsyncIterator[str]:
    """The SSE lines of a streamed completion; `run`/`first` come from `first_run`."""
    base = {"id": completion_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    usage = Usage()

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> str:
        body = {**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if plan.include_usage:
            body["usage"] = None
        return sse(body)

    def text_chunk(index: int) -> tuple[str, str]:
        # A content delta's line around its text: the event loop's work per streamed token is this
        # concatenation and json.dumps of the text alone (the same bytes as chunk(index, {"content": text}))
        line = chunk(index, {"content": _MARK})
        head, tail = line.split(json.dumps(_MARK), 1)
        return head, tail

    try:
        for i, opts in enumerate(plan.options):
            if i:
                run.close()
                run, first = EngineRun(engine, plan.messages, opts, plan.tools), None
            yield chunk(i, {"role": "assistant", "content": ""})
            head, tail = text_chunk(i)
            ev = first if first is not None else await run.next()
            streamed: list[str] = []
            while ev is not None:
                if isinstance(ev, TextDelta) and ev.text:
                    streamed.append(ev.text)
                    yield head + json.dumps(ev.text, ensure_ascii=False) + tail
                elif isinstance(ev, Done):
                    usage.prompt_tokens = ev.usage.prompt_tokens
                    usage.completion_tokens += ev.usage.completion_tokens
                    if i == 0:  # the prompt as it arrived; later choices find it cached by the first
                        usage.cached_tokens = ev.usage.cached_tokens
                    for line in _done_chunks(clean_done(ev, plan.tools), plan.legacy, "".join(streamed)):
                        yield chunk(i, *line)
                ev = await run.next()
        if plan.include_usage:
            yield sse({**base, "choices": [], "usage": usage_json(usage)})
    except Exception as e:  # noqa: BLE001  (the response has started: report in-band, as OpenAI does)
        from chatglm_core.api.errors import from_exception

        yield "data: " + from_exception(e).body.decode() + "\n\n"
    finally:
        run.close()
    yield "data: [DONE]\n\n"


def _done_chunks(done: Done, legacy: bool, streamed: str) -> list[tuple[dict[str, Any], str | None]]:
    calls = done.message.tool_calls
    out: list[tuple[dict[str, Any], str | None]] = []
    # A malformed call comes back as text; the backend held it back while streaming: send it now.
    shown, content = streamed.strip(), done.message.content
    if not calls and done.parse_error and content.startswith(shown) and len(content) > len(shown):
        out.append(({"content": content[len(shown):]}, None))
    if calls and legacy:
        out.append(({"function_call": _function_json(calls[0])}, None))
    elif calls:
        out.append(({"tool_calls": [{"index": k, **_tool_call_json(c)} for k, c in enumerate(calls)]}, None))
    out.append(({}, _finish(done, legacy)))
    return out


_MARK = "\u0000mark\u0000"  # stands for a delta's text in text_chunk (no model text is this string)


def sse(obj: dict[str, Any]) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"
