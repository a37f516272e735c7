"""The llama.cpp backend on the real embedded GGUF: same prompt ids and sampling as transformers.

Needs llama-cpp-python (requirements-llamacpp.txt, installed by `make test`); without it the
backend's tests skip. "auto" never picks llama.cpp: it is opt-in (CHATGLM_BACKEND=llamacpp).
"""

from __future__ import annotations

import sys
import threading
import types

import pytest

from chatglm_core.backends import llamacpp
from chatglm_core.backends.base import Constraint, GenerationOptions
from chatglm_core.engine import Engine
from chatglm_core.errors import ConfigError
from chatglm_core.messages import Done, Message, Role, TextDelta

needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed")
FRANCE = [Message(Role.USER, "What is the capital of France?")]


@pytest.fixture(scope="module")
def llama_backend(small_settings):
    backend = llamacpp.LlamaCppBackend.from_settings(small_settings.model_copy(update={"backend": "llamacpp"}))
    yield backend
    backend.close()


def text_of(events) -> tuple[str, Done]:
    text, done = "", None
    for ev in events:
        if isinstance(ev, TextDelta):
            text += ev.text
        else:
            done = ev
    return text, done


@needs_llamacpp
def test_greedy_reply_is_exact(llama_backend):
    # llama.cpp computes with the Q4_1 weights (transformers with their fp32 dequantization), so the
    # embedded model answers differently here than on the transformers backend
    text, done = text_of(llama_backend.stream(FRANCE, GenerationOptions(temperature=0, max_new_tokens=12)))
    assert text == "L'Étoile, la Cité, la Nation"
    assert done.finish_reason == "length" and done.usage.prompt_tokens == 37


@needs_llamacpp
def test_same_prompt_ids_as_transformers_and_tokens_as_llama_cpp_itself(llama_backend, small_backend):
    from llama_cpp import Llama

    q = [Message(Role.USER, "Write a haiku about the sea.")]
    ids = llama_backend.prompt_ids(q)
    assert ids == small_backend.prompt_ids(q)
    dec = llama_backend.begin(q, GenerationOptions(temperature=0, max_new_tokens=30))
    list(llamacpp_run(llama_backend, dec))
    ref = Llama(model_path=str(llama_backend.gguf), n_ctx=512, n_threads=llama_backend.n_threads, verbose=False)
    theirs = []
    for tok in ref.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        if tok in llama_backend.format.stop_token_ids or len(theirs) == 30:
            break
        theirs.append(tok)
    assert dec.generated == theirs


def llamacpp_run(backend, dec):
    from chatglm_core.backends.decoding import run_rows

    return run_rows(backend.open_rows(1), dec, None)


@needs_llamacpp
def test_eight_batched_callers_match_their_single_streams(llama_backend):
    prompts = ["What is 2+2?", "Name a color.", "Say hello in French.", "What is the capital of Italy?",
               "Write a haiku about the sea.", "List three fruits.", "Who wrote Hamlet?", "Explain gravity."]
    opts = GenerationOptions(temperature=0, max_new_tokens=24)
    expected = [text_of(llama_backend.stream([Message(Role.USER, p)], opts))[0] for p in prompts]
    engine = Engine(llama_backend)
    results: dict[int, str] = {}
    barrier = threading.Barrier(8)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = text_of(engine.stream([Message(Role.USER, prompts[i])], opts))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(8)] == expected
    assert sorted(llama_backend._free_seqs) == list(range(8)), "every row gave its sequence back"


@needs_llamacpp
def test_cancel_stop_strings_and_seed(llama_backend):
    engine = Engine(llama_backend)
    cancel = threading.Event()
    n, done = 0, None
    for ev in engine.stream([Message(Role.USER, "Tell me a very long story.")],
                            GenerationOptions(temperature=0, max_new_tokens=400), cancel=cancel):
        n += 1
        if n == 3:
            cancel.set()
        done = ev
    assert done.finish_reason == "cancelled" and done.usage.completion_tokens <= 5
    text, done = text_of(engine.stream(FRANCE, GenerationOptions(temperature=0, max_new_tokens=40, stop=["Cité"])))
    assert text == "L'Étoile, la " and done.finish_reason == "stop"
    sampled = GenerationOptions(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=1234, presence_penalty=0.5,
                                repetition_penalty=1.1)
    assert text_of(engine.stream(FRANCE, sampled))[0] == text_of(engine.stream(FRANCE, sampled))[0]


@needs_llamacpp
def test_constraint_processors_steer_llama_cpp(llama_backend, monkeypatch):
    """A constraint's logits processor (chatglm_core.constrain) is applied to llama.cpp's logits too."""
    tok = llama_backend.tokenizer
    allowed = [tok.convert_tokens_to_ids(d) for d in "0123456789"]

    def logits_processor(constraint, tokenizer, format_name):
        def only_digits(input_ids, scores):
            masked = scores.clone().fill_(float("-inf"))
            masked[:, allowed] = scores[:, allowed]
            return masked
        return only_digits

    monkeypatch.setitem(sys.modules, "chatglm_core.constrain", types.SimpleNamespace(logits_processor=logits_processor))
    opts = GenerationOptions(temperature=0, max_new_tokens=6, constraint=Constraint("json_object"))
    text, done = text_of(llama_backend.stream(FRANCE, opts))
    assert len(text) == 6 and text.isdigit() and done.finish_reason == "length"


def test_auto_means_transformers_and_llama_cpp_is_opt_in(small_settings):
    from chatglm_core.backends import load_backend
    from chatglm_core.backends.transformers_backend import TransformersBackend

    assert isinstance(load_backend(small_settings.model_copy(update={"backend": "auto"})), TransformersBackend)


def test_llama_cpp_needs_a_gguf_file(small_settings, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    settings = small_settings.model_copy(update={"backend": "llamacpp", "model_path": str(tmp_path)})
    if not llamacpp.available():
        with pytest.raises(ConfigError, match="requirements-llamacpp.txt"):
            llamacpp.LlamaCppBackend.from_settings(settings)
    else:
        with pytest.raises(ConfigError, match="runs .gguf files"):
            llamacpp.LlamaCppBackend.from_settings(settings)
