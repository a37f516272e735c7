"""The Python API ChatGLM3 users know: ``chat(query, history)`` and ``stream_chat(...)``.

    from chatglm_core import chat, stream_chat
    response, history = chat("Hello", history=[])
    for response, history in stream_chat("Tell me more", history=history):
        print(response)

``history`` is ChatGLM3's list of ``{"role", "content"}`` dicts (``metadata`` is accepted and
kept). Both share one process-wide engine, loaded on first use from the settings (MODEL_PATH…),
or take ``engine=`` explicitly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from chatglm_core import sampling
from chatglm_core.backends.base import GenerationOptions
from chatglm_core.engine import Engine
from chatglm_core.messages import Done, Message, Role, TextDelta
from chatglm_core.settings import Settings, load_settings

_default: Engine | None = None
_default_lock = threading.Lock()


def get_engine(settings: Settings | None = None) -> Engine:
    """The process-wide engine, loaded once (thread-safe)."""
    global _default
    with _default_lock:
        if _default is None:
            from chatglm_core.backends import load_backend

            _default = Engine(load_backend(settings or load_settings()))
        return _default


def history_to_messages(history: list[dict[str, Any]] | None) -> list[Message]:
    return [Message.from_openai(h) for h in history or []]


def options_from(settings: Settings | None = None, backend: Any = None, **overrides: Any) -> GenerationOptions:
    """Generation options: the overrides given (None = unset), else the sampling defaults the backend
    was loaded with (`load_backend`), else those of the settings (`chatglm_core.sampling`)."""
    s = settings or load_settings()
    opts = sampling.of(backend, s).options(max_new_tokens=s.max_new_tokens)
    for k, v in overrides.items():
        if v is not None:
            if not hasattr(opts, k):
                raise TypeError(f"unknown generation option {k!r}")
            setattr(opts, k, v)
    return opts


def stream_chat(query: str, history: list[dict[str, Any]] | None = None, *, role: str = "user",
                engine: Engine | None = None, cancel: threading.Event | None = None,
                **options: Any) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Yield (response so far, history including this exchange) as the reply grows.

    Options: max_new_tokens, temperature (0 = greedy), top_p, repetition_penalty, stop, seed…
    A history longer than the context window loses its oldest turns from the model's view
    (`chatglm_core.context`); `history` itself is returned whole.
    """
    engine = engine or get_engine()
    history = list(history or [])
    messages = history_to_messages(history) + [Message(Role(role if role != "observation" else "tool"), query)]
    new_history = history + [{"role": role, "content": query}]
    response = ""
    for ev in engine.stream(messages, options_from(backend=engine.backend, **options), cancel=cancel,
                            fit_context=True):
        if isinstance(ev, TextDelta):
            response += ev.text
            yield response, new_history + [{"role": "assistant", "content": response}]
        elif isinstance(ev, Done):
            response = ev.message.content if not ev.message.tool_calls else ev.raw_text.strip()
    yield response, new_history + [{"role": "assistant", "content": response}]


def chat(query: str, history: list[dict[str, Any]] | None = None, **kwargs: Any) -> tuple[str, list[dict[str, Any]]]:
    """The whole reply and the updated history."""
    response, new_history = "", list(history or [])
    for response, new_history in stream_chat(query, history, **kwargs):
        pass
    return response, new_history
