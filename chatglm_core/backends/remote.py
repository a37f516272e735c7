"""A backend that generates on any OpenAI-compatible engine (vLLM, Ollama, this project's server).

Selected by CHATGLM_REMOTE_BASE_URL, so the app and the CLI work unchanged against a remote
engine. Messages go out in the OpenAI wire shape; streamed tool-call deltas are assembled back
into `ToolCall`s. A `Constraint` becomes `response_format` / `tool_choice`, which the remote
enforces itself. The code interpreter has no OpenAI equivalent, so interpreter turns travel as
text (a ```python block, its output as a user turn) and the reply's code block is parsed here.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

from chatglm_core.backends.base import Constraint, GenerationOptions
from chatglm_core.errors import ConfigError, GenerationError, RequestError
from chatglm_core.formats.hf_template import INTERPRETER_PROMPT
from chatglm_core.formats.parsing import parse_json_turn
from chatglm_core.messages import INTERPRETER, Done, Message, Role, TextDelta, ToolCall, Usage


class RemoteBackend:
    device = "remote"
    context_window: int | None = None

    def __init__(self, client: Any, model: str, base_url: str) -> None:
        self.client = client
        self.model_name = model
        self.base_url = base_url

    @classmethod
    def from_settings(cls, settings: Any) -> RemoteBackend:
        import openai

        if not settings.remote_base_url:
            raise ConfigError("the remote backend needs CHATGLM_REMOTE_BASE_URL (e.g. http://localhost:8000/v1)")
        client = openai.OpenAI(base_url=settings.remote_base_url, api_key=settings.remote_api_key or "none",
                               max_retries=0, timeout=openai.Timeout(600.0, connect=10.0))
        model = settings.remote_model
        if not model:
            try:
                models = client.models.list().data
            except openai.OpenAIError as e:
                raise ConfigError(f"could not list the models of {settings.remote_base_url} ({_reason(e)}): check the "
                                  "URL and that the engine is running, or set CHATGLM_REMOTE_MODEL") from None
            if not models:
                raise ConfigError(f"{settings.remote_base_url} serves no models: set CHATGLM_REMOTE_MODEL")
            model = models[0].id
        return cls(client, model, settings.remote_base_url)

    def count_tokens(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> int:
        """An estimate (about four characters a token): the remote tokenizer is not known here."""
        chars = sum(len(m.content) + sum(len(json.dumps(c.arguments)) for c in m.tool_calls) for m in messages)
        return (chars + len(json.dumps(tools or []))) // 4 + 4 * len(messages)

    # --- one request -----------------------------------------------------------------------
    def request(self, messages: list[Message], options: GenerationOptions, tools: list[dict[str, Any]] | None,
                interpreter: bool) -> dict[str, Any]:
        """The keyword arguments of `chat.completions.create` for this generation."""
        wire = wire_messages(messages)
        if interpreter and (not wire or wire[0]["role"] != "system"):
            wire.insert(0, {"role": "system", "content": INTERPRETER_PROMPT})
        kw: dict[str, Any] = {"model": self.model_name, "messages": wire, "max_tokens": options.max_new_tokens,
                              "temperature": options.temperature, "top_p": options.top_p}
        if options.stop:
            kw["stop"] = options.stop[:4]
        if options.seed is not None:
            kw["seed"] = options.seed
        if options.presence_penalty:
            kw["presence_penalty"] = options.presence_penalty
        if options.frequency_penalty:
            kw["frequency_penalty"] = options.frequency_penalty
        extra = {}
        if options.repetition_penalty != 1.0:
            extra["repetition_penalty"] = options.repetition_penalty
        if options.top_k:
            extra["top_k"] = options.top_k
        if extra:
            kw["extra_body"] = extra
        if tools:
            kw["tools"] = tools
        if options.constraint is not None:
            kw.update(constraint_kwargs(options.constraint, tools))
        return kw

    def stream(self, messages: list[Message], options: GenerationOptions, *, tools: list[dict[str, Any]] | None = None,
               interpreter: bool = False, cancel: threading.Event | None = None) -> Iterator[TextDelta | Done]:
        import openai

        kw = self.request(messages, options, tools, interpreter)
        text, finish, usage = "", "stop", Usage(self.count_tokens(messages, tools), 0)
        calls: dict[int, dict[str, str]] = {}
        try:
            response = self.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        except openai.OpenAIError as e:
            raise self._error(e) from None
        try:
            for chunk in response:
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                if chunk.usage:
                    details = getattr(chunk.usage, "prompt_tokens_details", None)  # the engine's own cache
                    usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens,
                                  getattr(details, "cached_tokens", None) or 0)
                for choice in chunk.choices[:1]:
                    delta = choice.delta
                    if delta.content:
                        text += delta.content
                        yield TextDelta(delta.content)
                    for tc in delta.tool_calls or []:
                        _merge_call(calls, tc.index, tc.id, tc.function)
                    if delta.function_call:  # an engine answering in the legacy shape
                        _merge_call(calls, 0, None, delta.function_call)
                    if choice.finish_reason:
                        finish = {"tool_calls": "tool_calls", "function_call": "tool_calls",
                                  "length": "length"}.get(choice.finish_reason, "stop")
        except openai.OpenAIError as e:
            raise self._error(e) from None
        finally:
            response.close()
        yield self._done(text, calls, finish, usage, interpreter)

    def _done(self, text: str, calls: dict[int, dict[str, str]], finish: str, usage: Usage, interpreter: bool) -> Done:
        parsed: list[ToolCall] = []
        for _, raw in sorted(calls.items()):
            try:
                args = json.loads(raw["arguments"] or "{}")
            except json.JSONDecodeError as e:
                error = f"the arguments of {raw['name']!r} are not valid JSON ({e.msg}): {raw['arguments'][:200]!r}"
                return Done(Message(Role.ASSISTANT, text.strip()), finish, usage, raw_text=text, parse_error=error)
            if not isinstance(args, dict):
                error = f"the arguments of {raw['name']!r} must be a JSON object"
                return Done(Message(Role.ASSISTANT, text.strip()), finish, usage, raw_text=text, parse_error=error)
            parsed.append(ToolCall(raw["name"], args, raw["id"]) if raw["id"] else ToolCall(raw["name"], args))
        if parsed:
            return Done(Message(Role.ASSISTANT, text.strip(), parsed), "tool_calls" if finish != "cancelled"
                        else finish, usage, raw_text=text)
        message = parse_json_turn(text, interpreter=interpreter) if interpreter else Message(Role.ASSISTANT, text.strip())
        if message.tool_calls and finish != "cancelled":
            finish = "tool_calls"
        return Done(message, finish, usage, raw_text=text)

    def _error(self, e: Exception) -> Exception:
        import openai

        if isinstance(e, openai.APIStatusError) and 400 <= e.status_code < 500 and e.status_code not in (401, 403):
            body = e.body if isinstance(e.body, dict) else {}
            detail = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
            return RequestError(f"the remote engine rejected the request: {detail.get('message') or e.message}",
                                param=detail.get("param"), status=e.status_code, code=detail.get("code"))
        return GenerationError(f"the remote engine at {self.base_url} failed ({_reason(e)}): check that it is "
                               "running and CHATGLM_REMOTE_BASE_URL / CHATGLM_REMOTE_API_KEY are right")


def _merge_call(calls: dict[int, dict[str, str]], index: int, call_id: str | None, fn: Any) -> None:
    slot = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
    if call_id:
        slot["id"] = call_id
    if fn is not None:
        slot["name"] += fn.name or ""
        slot["arguments"] += fn.arguments or ""


def _reason(e: Exception) -> str:
    status = getattr(e, "status_code", None)
    return f"HTTP {status}: {getattr(e, 'message', e)}" if status else f"{type(e).__name__}: {e}"


def constraint_kwargs(c: Constraint, tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A Constraint as the OpenAI parameters that ask the remote engine to enforce it."""
    if c.kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if c.kind == "json_schema":
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "response", "schema": c.schema or {}, "strict": True}}}
    out: dict[str, Any] = {"tools": list(c.tools) or tools or []}
    if c.tool_name:
        out["tool_choice"] = {"type": "function", "function": {"name": c.tool_name}}
    else:
        out["tool_choice"] = "auto" if c.auto else "required"
    return out


def wire_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages in the OpenAI shape; interpreter calls and their outputs become plain text turns."""
    interpreter_ids: set[str] = set()
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role is Role.ASSISTANT and any(c.name == INTERPRETER for c in m.tool_calls):
            interpreter_ids.update(c.id for c in m.tool_calls if c.name == INTERPRETER)
            code = "\n".join(f"```python\n{c.code}\n```" for c in m.tool_calls if c.name == INTERPRETER)
            out.append({"role": "assistant", "content": (m.content + "\n" if m.content else "") + code})
        elif m.role is Role.TOOL and (m.tool_call_id in interpreter_ids or m.name == INTERPRETER):
            out.append({"role": "user", "content": f"Output of the code:\n{m.content}"})
        else:
            out.append(m.to_openai())
    return out
