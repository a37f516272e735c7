"""The one backend interface: stream a reply for a list of messages with generation options.

Implementations: `transformers_backend.TransformersBackend` (local HF models and GGUF files),
`remote.RemoteBackend` (any OpenAI-compatible engine). A backend yields `TextDelta`s as text is
decoded and ends with exactly one `Done` carrying the parsed assistant message. Backends are not
thread-safe; the `Engine` serialises (or batches) access to them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from chatglm_core.messages import Done, Message, TextDelta


@dataclass(frozen=True)
class Constraint:
    """A grammar the reply must follow; compiled by `chatglm_core.constrain` for local backends.

    kind:
      - "json_schema": the whole reply is JSON valid under `schema`;
      - "json_object": the whole reply is a JSON object;
      - "tool_call": the reply is a call of one of `tools` (only `tool_name` if set) in the
        prompt format's call syntax. With `auto=True` the model may answer in text; once it
        opens a call the rest is decoded under the grammar.
    """

    kind: Literal["json_schema", "json_object", "tool_call"]
    schema: dict[str, Any] | None = None
    tools: tuple[dict[str, Any], ...] = ()
    tool_name: str | None = None
    auto: bool = False


@dataclass
class GenerationOptions:
    max_new_tokens: int = 512
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    constraint: Constraint | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Backend(Protocol):
    #: The model's name as shown to users and in the API.
    model_name: str
    #: Where it runs ("cpu", "cuda:0", "remote").
    device: str
    #: Longest prompt + reply in tokens (None when unknown, e.g. remote).
    context_window: int | None

    def stream(
        self,
        messages: list[Message],
        options: GenerationOptions,
        *,
        tools: list[dict[str, Any]] | None = None,
        interpreter: bool = False,
        cancel: threading.Event | None = None,
    ) -> Iterator[TextDelta | Done]:
        """Yield text as it is decoded, then one Done. Setting `cancel` ends it within a token."""
        ...

    def count_tokens(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> int:
        """Prompt length in tokens (an estimate for remote backends)."""
        ...
