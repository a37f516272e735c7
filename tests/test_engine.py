"""The engine and the transformers backend on the real SmolLM2, loaded through the real path."""

import threading
import time

import pytest

from chatglm_core.backends.base import GenerationOptions
from chatglm_core.engine import Engine
from chatglm_core.errors import RequestError
from chatglm_core.messages import Done, Message, Role, TextDelta

GREEDY = GenerationOptions(temperature=0, max_new_tokens=40)
FRANCE = [Message(Role.USER, "What is the capital of France?")]


def collect(engine, messages, options=GREEDY, **kw):
    text, done = "", None
    for ev in engine.stream(messages, options, **kw):
        if isinstance(ev, TextDelta):
            text += ev.text
        else:
            done = ev
    return text, done


def test_greedy_output_is_exact(small_engine):
    text, done = collect(small_engine, FRANCE)
    assert text == "The capital of France is Paris."
    assert done.message.content == text
    assert done.finish_reason == "stop"
    assert done.usage.prompt_tokens == 37
    assert done.usage.completion_tokens == 8  # 7 text tokens + <|im_end|>


def test_streaming_equals_non_streaming_and_generate(small_engine, small_backend):
    import torch

    q = [Message(Role.USER, "Write a haiku about the sea.")]
    opts = GenerationOptions(temperature=0, max_new_tokens=30)
    text, done = collect(small_engine, q, opts)
    assert small_engine.complete(q, opts).message.content == done.message.content == text.strip()
    ids = small_backend.prompt_ids(q)
    with torch.inference_mode():
        out = small_backend.model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)
    assert small_backend.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip() == text.strip()
    assert done.finish_reason == "length"


def test_stop_strings_cut_the_reply(small_engine):
    opts = GenerationOptions(temperature=0, max_new_tokens=40, stop=["Paris"])
    text, done = collect(small_engine, FRANCE, opts)
    assert text == "The capital of France is "
    assert done.finish_reason == "stop"


def test_seed_makes_sampling_reproducible(small_engine):
    opts = GenerationOptions(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=1234)
    assert collect(small_engine, FRANCE, opts)[0] == collect(small_engine, FRANCE, opts)[0]


def test_cancel_stops_within_a_token_and_frees_the_model(small_engine):
    cancel = threading.Event()
    opts = GenerationOptions(temperature=0, max_new_tokens=400)
    story = [Message(Role.USER, "Tell me a very long story about a dragon.")]
    seen = 0
    done = None
    for ev in small_engine.stream(story, opts, cancel=cancel):
        if isinstance(ev, TextDelta):
            seen += 1
            if seen == 3:
                cancel.set()
        else:
            done = ev
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens <= 5
    # the lock is free again: the next caller starts at once
    assert collect(small_engine, FRANCE, GenerationOptions(temperature=0, max_new_tokens=3))[1].usage.completion_tokens == 3


def test_closing_the_stream_cancels(small_engine):
    gen = small_engine.stream([Message(Role.USER, "Count to one hundred.")],
                              GenerationOptions(temperature=0, max_new_tokens=400))
    next(gen)
    assert small_engine.busy() == 1
    gen.close()
    deadline = time.monotonic() + 5
    while small_engine.busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert small_engine.busy() == 0, "generation kept running after the caller left"


def test_four_concurrent_callers_get_their_own_greedy_output(small_engine):
    prompts = ["What is 2+2?", "Name a color.", "Say hello in French.", "What is the capital of Italy?"]
    opts = GenerationOptions(temperature=0, max_new_tokens=16)
    expected = [collect(small_engine, [Message(Role.USER, p)], opts)[0] for p in prompts]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = collect(small_engine, [Message(Role.USER, prompts[i])], opts)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(4)] == expected


def test_prompt_longer_than_context_is_a_request_error(small_engine, small_backend, monkeypatch):
    monkeypatch.setattr(small_backend, "context_window", 20)
    with pytest.raises(RequestError, match="context window"):
        collect(small_engine, FRANCE)


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "must not be empty"),
        ([Message(Role.USER, "a"), Message(Role.SYSTEM, "b")], "system message may only come first"),
        ([Message(Role.TOOL, "x")], "tool message must follow"),
        ([Message(Role.USER, "a"), Message(Role.ASSISTANT, "b")], "last message"),
    ],
)
def test_bad_conversations_are_rejected(small_engine, messages, fragment):
    with pytest.raises(RequestError, match=fragment):
        collect(small_engine, messages)


def test_backend_failure_becomes_generation_error(scripted):
    from chatglm_core.errors import GenerationError

    engine = Engine(scripted)  # nothing enqueued: the backend raises
    with pytest.raises(GenerationError, match="generation failed"):
        collect(engine, FRANCE)
    scripted.enqueue("still works")
    assert collect(engine, FRANCE)[0] == "still works"


def test_chatglm3_checkpoint_through_the_engine(small_settings):
    """MODEL_PATH at a ChatGLM3 folder: native loading, ChatGLM3 format, reference greedy reply."""
    import json
    from pathlib import Path

    from chatglm_core.backends import load_backend
    from chatglm_core.formats.chatglm3 import ChatGLM3Format

    fixture = Path(__file__).parent / "fixtures" / "chatglm3-tiny"
    ref = json.loads((fixture / "reference.json").read_text())
    backend = load_backend(small_settings.model_copy(update={"model_path": str(fixture)}))
    assert isinstance(backend.format, ChatGLM3Format)
    done = Engine(backend).complete([Message(Role.USER, "hello world")],
                                    GenerationOptions(temperature=0, max_new_tokens=122))
    assert done.raw_text == ref["chat_greedy_text"]
    assert done.usage.completion_tokens == 122 and done.finish_reason == "length"
