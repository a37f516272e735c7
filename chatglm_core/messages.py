"""The small value types every layer speaks: roles, messages, tool calls, stream events.

Dicts appear only at the boundaries (JSON, YAML, HTTP); inside the engine everything is one of
these dataclasses. `Message.to_openai`/`from_openai` are the one place the OpenAI wire shape is
translated.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from chatglm_core.errors import RequestError

#: Tool name of a code-interpreter call; its arguments are ``{"code": "..."}``.
INTERPRETER = "interpreter"


class Role(str, Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"  # ChatGLM3 calls this role "observation"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=new_call_id)

    @property
    def code(self) -> str:
        """The code of an interpreter call ('' for other tools)."""
        return str(self.arguments.get("code", "")) if self.name == INTERPRETER else ""


@dataclass
class Message:
    role: Role
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None  # a TOOL message answers this call
    name: str | None = None  # a TOOL message: the tool that produced it
    images: list[bytes] = field(default_factory=list)  # PNGs shown with a TOOL message (not sent to the model)
    # what a front end records about a reply (how it ended, tokens, timings); never sent to the model
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.role = Role(self.role)

    # --- the OpenAI wire shape ------------------------------------------------------------
    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role.value, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name and self.role is Role.TOOL:
            out["name"] = self.name
        return out

    @classmethod
    def from_openai(cls, data: dict[str, Any]) -> Message:
        """Build a message from an OpenAI-style dict; raises RequestError on a bad shape."""
        if not isinstance(data, dict):
            raise RequestError("each message must be an object with 'role' and 'content'")
        role = data.get("role")
        if role == "function":  # legacy functions API
            role = "tool"
        if role == "observation":  # ChatGLM3 history
            role = "tool"
        try:
            role = Role(role)
        except ValueError:
            raise RequestError(f"unknown role {role!r}: use system, user, assistant or tool") from None
        content = data.get("content")
        if isinstance(content, list):  # content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RequestError("message 'content' must be a string or a list of text parts")
        calls = []
        for raw in data.get("tool_calls") or []:
            fn = (raw or {}).get("function") or {}
            calls.append(ToolCall(str(fn.get("name", "")), _arguments(fn.get("arguments")), raw.get("id") or new_call_id()))
        if data.get("function_call"):
            fn = data["function_call"]
            calls.append(ToolCall(str(fn.get("name", "")), _arguments(fn.get("arguments"))))
        # ChatGLM3 history: assistant turn with metadata naming the tool
        return cls(role, content, calls, data.get("tool_call_id"), data.get("name"))


def _arguments(raw: Any) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RequestError(f"tool call arguments are not valid JSON: {e}") from None
        if isinstance(value, dict):
            return value
    raise RequestError("tool call arguments must be a JSON object")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: prompt tokens whose KV came from the backend's prefix cache instead of being computed (OpenAI's
    #: usage.prompt_tokens_details.cached_tokens)
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# --- stream events --------------------------------------------------------------------------
@dataclass
class TextDelta:
    """A piece of assistant text, as it is decoded."""

    text: str


@dataclass
class Done:
    """The end of one generation: the parsed assistant message and why it stopped.

    finish_reason: "stop" (eos or a stop string), "length", "tool_calls", "cancelled", or "max_rounds"
    (the agent stopped a turn that kept calling tools).
    """

    message: Message
    finish_reason: str
    usage: Usage
    raw_text: str = ""
    parse_error: str | None = None


@dataclass
class ToolCallEvent:
    """The agent is about to run this call."""

    call: ToolCall


@dataclass
class ToolResultEvent:
    """A call's result, as the model will see it (the message is a TOOL message)."""

    call: ToolCall
    message: Message
    ok: bool = True


@dataclass
class NeedObservation:
    """Manual mode: the agent stops here until the user supplies the call's result."""

    call: ToolCall


@dataclass
class ContextTrimmed:
    """The conversation outgrew the context window: the model does not see `left_out` (the oldest
    turns) and sees only part of each message in `cut` (see `chatglm_core.context`). The messages
    are the caller's own objects, so a front end can point at them."""

    left_out: list[Message]
    cut: list[Message]
    context_window: int


Event = TextDelta | Done | ToolCallEvent | ToolResultEvent | NeedObservation | ContextTrimmed
