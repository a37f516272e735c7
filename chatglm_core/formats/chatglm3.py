"""ChatGLM3's native prompt format: role tokens by id, a metadata line per turn, plain-text content.

A prompt is `[gMASK] sop`, then per turn `<|role|>` + encode(metadata + "\\n") + encode(content),
and finally `<|assistant|>` (what ChatGLM3's `build_chat_input` builds). Role tokens enter only by
id; content is encoded as plain text, so "<|assistant|>" typed by a user stays text.

An assistant turn is "metadata\\ncontent": empty metadata for text, a tool name followed by a
```python tool_call(...)``` block, or "interpreter" followed by code. One reply may hold several
such segments, each after its own `<|assistant|>`; `decode_reply` keeps those markers so that
`parse` can split them.
"""

from __future__ import annotations

import json
from typing import Any

from chatglm_core.formats.base import function_specs
from chatglm_core.formats.parsing import extract_code_block, parse_chatglm3_turn, render_tool_call_python
from chatglm_core.messages import INTERPRETER, Message, Role, ToolCall

#: The system prompt ChatGLM3's tool demo uses; the tool list follows it as indented JSON.
TOOLS_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
#: Our own wording of the composite demo's code-interpreter system prompt.
INTERPRETER_SYSTEM_PROMPT = (
    "You are ChatGLM, an AI assistant connected to a computer with a Python (Jupyter) environment and no "
    "internet access. When a task is best solved with code, write Python and run it; you will see its output. "
    "If the result shows an error, fix the code and run it again."
)
_ROLES = {Role.SYSTEM: "system", Role.USER: "user", Role.ASSISTANT: "assistant", Role.TOOL: "observation"}
SEGMENT = "<|assistant|>"
_STOP_TEXTS = ("<|user|>", "<|observation|>")


class ChatGLM3Format:
    name = "chatglm3"
    stop_strings: list[str] = []
    #: The backend puts this first in interpreter mode when the conversation has no system message.
    interpreter_prompt = INTERPRETER_SYSTEM_PROMPT

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        special = tokenizer.special_tokens
        self._role_ids = {role: special[f"<|{role}|>"] for role in ("system", "user", "assistant", "observation")}
        self._prefix = [special["[gMASK]"], special["sop"]]
        self.stop_token_ids = [tokenizer.eos_token_id, special["<|user|>"], special["<|observation|>"]]

    # --- messages → ids -------------------------------------------------------------------
    def encode(self, messages: list[Message], tools: list[dict[str, Any]] | None = None, *,
               interpreter: bool = False) -> list[int]:
        ids = list(self._prefix)
        for role, metadata, content in self.turns(messages, tools, interpreter=interpreter):
            ids += self._turn(role, metadata, content)
        return ids + [self._role_ids["assistant"]]

    def turns(self, messages: list[Message], tools: list[dict[str, Any]] | None = None, *,
              interpreter: bool = False) -> list[tuple[str, str, str]]:
        """(role, metadata, content) per ChatGLM3 turn, system prompt and tool list included."""
        specs = function_specs(tools)
        turns: list[tuple[str, str, str]] = []
        for m in messages:
            turns += _message_turns(m)
        if (specs or interpreter) and not any(role == "system" for role, _, _ in turns):
            default = TOOLS_SYSTEM_PROMPT if specs else INTERPRETER_SYSTEM_PROMPT
            if specs and interpreter:
                default = INTERPRETER_SYSTEM_PROMPT + "\n" + TOOLS_SYSTEM_PROMPT
            turns.insert(0, ("system", "", default))
        if specs:  # ChatGLM3 appends the tool list to the (first) system turn
            i = next(i for i, t in enumerate(turns) if t[0] == "system")
            role, metadata, content = turns[i]
            turns[i] = (role, metadata, content + "\n" + json.dumps(specs, indent=4, ensure_ascii=False))
        return turns

    def _turn(self, role: str, metadata: str, content: str) -> list[int]:
        encode = self.tokenizer.encode
        return ([self._role_ids[role]] + encode(f"{metadata}\n", add_special_tokens=False)
                + encode(content, add_special_tokens=False))

    # --- generated ids → text → message ---------------------------------------------------------
    def decode_reply(self, ids: Any) -> str:
        """Generated ids → text with each new segment's `<|assistant|>` kept (other control tokens,
        eos and the stop tokens dropped), ready for `parse`."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        for stop in _STOP_TEXTS:
            text = text.split(stop, 1)[0]
        return text

    def parse(self, text: str, *, tools: bool = False, interpreter: bool = False) -> Message:
        """A finished reply → one assistant message: the text of its plain segments, and the tool
        or interpreter call of the others (ChatGLM3's `process_response`, without its eval)."""
        contents: list[str] = []
        calls: list[ToolCall] = []
        for segment in text.split(SEGMENT):
            if not segment.strip():
                continue
            part = parse_chatglm3_turn(segment, tools=tools, interpreter=interpreter)
            if part.content:
                contents.append(part.content)
            calls += part.tool_calls
        return Message(Role.ASSISTANT, "\n".join(contents), calls)


def _message_turns(m: Message) -> list[tuple[str, str, str]]:
    if m.role is not Role.ASSISTANT or not m.tool_calls:
        return [(_ROLES[m.role], "", m.content)]
    turns = [("assistant", "", m.content)] if m.content else []
    for call in m.tool_calls:
        if call.name == INTERPRETER:
            turns.append(("assistant", INTERPRETER, f"```python\n{call.code}\n```"))
        else:
            turns.append(("assistant", call.name, render_tool_call_python(call)))
    return turns


def from_chatglm3_history(history: list[dict[str, Any]]) -> tuple[list[Message], list[dict[str, Any]]]:
    """ChatGLM3's `history` (dicts with role/metadata/content, tools on the system turn) →
    (messages, tools), so `chat(query, history)` callers keep ChatGLM3's shape. Raises ParseError
    for an assistant turn whose tool call is not `tool_call(name=literal, ...)`."""
    messages: list[Message] = []
    tools: list[dict[str, Any]] = []
    for item in history:
        role, metadata, content = item["role"], (item.get("metadata") or "").strip(), item.get("content", "")
        if role == "system" and "tools" in item:
            tools += [{"type": "function", "function": spec} for spec in item["tools"]]
        if role == "assistant" and metadata == INTERPRETER:
            code = extract_code_block(content)
            call = ToolCall(INTERPRETER, {"code": content if code is None else code})
            messages.append(Message(Role.ASSISTANT, "", [call]))
        elif role == "assistant" and metadata:
            messages.append(parse_chatglm3_turn(f"{metadata}\n{content}", tools=True))
        else:
            messages.append(Message.from_openai({"role": role, "content": content}))
    return messages, tools
