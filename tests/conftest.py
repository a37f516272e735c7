"""Shared fixtures: the real small model through the real loading path, and a scripted fake backend.

The embedded SmolLM2 is dequantized once into a cache directory shared by the whole test session
(CHATGLM_TEST_DATA, default /tmp/chatglm-test-data) so only the first run pays ~15 s.
"""

from __future__ import annotations

import gc
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatglm_core.backends.base import GenerationOptions
from chatglm_core.messages import Done, Message, Role, TextDelta, Usage

TEST_DATA = Path(os.environ.get("CHATGLM_TEST_DATA", "/tmp/chatglm-test-data"))


@pytest.fixture(autouse=True)
def _unfreeze_after_each_test() -> Iterator[None]:
    """The app freezes what it holds once its model is loaded (webui/state.py, gc.freeze): in a server that
    is what lives as long as the process, in this one it is whatever the test held, which the collector
    must see again once the test is over (a model in a reference cycle would be kept for good)."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def test_data_dir() -> Path:
    TEST_DATA.mkdir(parents=True, exist_ok=True)
    return TEST_DATA


@pytest.fixture(scope="session")
def small_settings(test_data_dir: Path):
    from chatglm_core.settings import load_settings

    return load_settings(data_dir=test_data_dir, model_path=None, device="cpu", backend="transformers")


@pytest.fixture(scope="session")
def small_backend(small_settings):
    """The real SmolLM2-135M-Instruct, loaded through the same path the app uses."""
    from chatglm_core.backends.transformers_backend import TransformersBackend

    return TransformersBackend.from_settings(small_settings)


@pytest.fixture(scope="session")
def small_engine(small_backend):
    from chatglm_core.engine import Engine

    return Engine(small_backend)


class ScriptedBackend:
    """A fake backend for orchestration tests: `enqueue()` the raw texts it should 'generate'.

    Each reply is parsed with the real prompt format's parser (JSON tool-call form by default), so
    tool loops see exactly what a model writing that text would produce.
    """

    model_name = "scripted"
    device = "cpu"
    context_window = 4096

    def __init__(self, parse: Any = None) -> None:
        from chatglm_core.formats.parsing import parse_json_turn

        self.parse = parse or parse_json_turn
        self.replies: list[str] = []
        self.calls: list[list[Message]] = []
        self.lock = threading.Lock()

    def enqueue(self, *texts: str) -> ScriptedBackend:
        self.replies.extend(texts)
        return self

    def count_tokens(self, messages: list[Message], tools: Any = None) -> int:
        return sum(len(m.content.split()) for m in messages)

    def stream(self, messages: list[Message], options: GenerationOptions, *, tools: Any = None,
               interpreter: bool = False, cancel: threading.Event | None = None) -> Iterator[TextDelta | Done]:
        self.calls.append(list(messages))
        if not self.replies:
            raise AssertionError("ScriptedBackend: no reply enqueued for this call")
        text = self.replies.pop(0)
        for piece in re.findall(r"\S+\s*|\s+", text):
            if cancel is not None and cancel.is_set():
                yield Done(Message(Role.ASSISTANT, ""), "cancelled", Usage())
                return
            yield TextDelta(piece)
        message = self.parse(text, tools=bool(tools), interpreter=interpreter)
        finish = "tool_calls" if message.tool_calls else "stop"
        yield Done(message, finish, Usage(self.count_tokens(messages), len(text.split())), raw_text=text)


@pytest.fixture
def scripted() -> ScriptedBackend:
    return ScriptedBackend()
