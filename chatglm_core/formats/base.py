"""What a prompt format is: messages (+ tools) → token ids, and finished text → a message.

Two implementations: `hf_template.HFTemplateFormat` (the model's own chat template) and
`chatglm3.ChatGLM3Format` (ChatGLM3's native roles, chosen automatically for ChatGLM3 models).
Both must keep control-token text inside message content as plain text, so a user (or a tool
result) can never forge a role or a call.
"""

from __future__ import annotations

from typing import Any, Protocol

from chatglm_core.messages import Message


class PromptFormat(Protocol):
    name: str
    #: Strings that end an assistant turn in decoded text (besides the stop token ids).
    stop_strings: list[str]
    #: Token ids that end an assistant turn (eos and the format's role tokens).
    stop_token_ids: list[int]

    def encode(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the whole prompt, ending where the assistant's reply begins."""
        ...

    def parse(self, text: str, *, tools: bool = False, interpreter: bool = False) -> Message:
        """The assistant message for a finished turn's text; raises ParseError on a malformed call."""
        ...


def function_specs(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """OpenAI `tools` entries → their inner function specs ({name, description, parameters})."""
    specs = []
    for t in tools or []:
        spec = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(spec, dict) and spec.get("name"):
            specs.append(spec)
    return specs
