"""Shared by the reliability tests (properties, fuzzing, soak): a backend that answers anything,
and the checks every error response must pass.

`AnswerBackend` replies to any conversation with a few words (never more than max_new_tokens),
so fuzzers can drive the whole request path without enqueueing replies; it raises nothing on its
own, so any 5xx it sees comes from our request handling.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

from chatglm_core.backends.base import GenerationOptions
from chatglm_core.messages import Done, Message, Role, TextDelta, Usage

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error"}


class AnswerBackend:
    model_name = "answer-bot"
    device = "cpu"
    context_window = 4096
    words = ("Sure", "thing", "here", "you", "go")

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def count_tokens(self, messages: list[Message], tools: Any = None) -> int:
        return sum(len(m.content) // 4 + 1 for m in messages)

    def stream(self, messages: list[Message], options: GenerationOptions, *, tools: Any = None,
               interpreter: bool = False, cancel: threading.Event | None = None) -> Iterator[TextDelta | Done]:
        with self.lock:
            self.calls += 1
        n = min(options.max_new_tokens, len(self.words))
        text = ""
        for word in self.words[:n]:
            if cancel is not None and cancel.is_set():
                yield Done(Message(Role.ASSISTANT, text), "cancelled", Usage())
                return
            piece = word if not text else " " + word
            text += piece
            yield TextDelta(piece)
        finish = "length" if n == options.max_new_tokens else "stop"
        yield Done(Message(Role.ASSISTANT, text), finish, Usage(self.count_tokens(messages), n), raw_text=text)


def answer_app(**settings: Any):
    """create_app over an AnswerBackend; returns (app, backend)."""
    from chatglm_core.api import create_app
    from chatglm_core.engine import Engine
    from chatglm_core.settings import Settings

    backend = AnswerBackend()
    return create_app(Settings(**settings), Engine(backend)), backend


def assert_openai_error(status: int, body: Any) -> None:
    """A 4xx in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with a message."""
    assert 400 <= status < 500, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert err["type"] == ERROR_TYPES.get(status, "invalid_request_error"), (status, err)
    assert err["param"] is None or isinstance(err["param"], str), err


def sse_payloads(text: str) -> list[Any]:
    """The JSON payloads of an SSE body, in order; asserts it ends with [DONE]."""
    lines = [line for line in text.splitlines() if line]
    assert lines and lines[-1] == "data: [DONE]", lines[-3:]
    assert all(line.startswith("data: ") for line in lines), lines
    return [json.loads(line[6:]) for line in lines[:-1]]
