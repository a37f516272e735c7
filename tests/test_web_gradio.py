"""The Gradio web chat: served as a subprocess and driven through its HTTP API (gradio_client),
the Stop button's cancellation reaching the engine, and the message shown without gradio."""

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatglm_core.chat import options_from
from chatglm_core.errors import GenerationError
from chatglm_core.messages import Done, Message, Role, TextDelta, Usage
from chatglm_core.web_gradio import STOPPED, text_of, to_messages

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"
REP_PENALTY = 1.05  # passed to the server explicitly so both sides decode alike


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_reply(history: list[dict]) -> str:
    assert history and history[-1]["role"] == "assistant", history
    return text_of(history[-1]["content"])


@pytest.fixture(scope="module")
def server(small_settings, tmp_path_factory):
    """`python -m chatglm_core.web_gradio` on a free loopback port, as a user starts it."""
    home = tmp_path_factory.mktemp("gradio-home")
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "CHATGLM_DATA_DIR": str(small_settings.data_dir), "GRADIO_TEMP_DIR": str(home / "tmp")}
    log = (home / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "chatglm_core.web_gradio", "--port", str(port), "--device", "cpu",
                             "--repetition-penalty", str(REP_PENALTY)],
                            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{(home / 'server.log').read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"server did not start:\n{(home / 'server.log').read_text()}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_streamed_reply_equals_engine_greedy_output(server, small_engine, small_settings):
    from gradio_client import Client

    expected = small_engine.complete(
        [Message(Role.USER, QUESTION)],
        options_from(small_settings, temperature=0.0, top_p=0.9, max_new_tokens=24, repetition_penalty=REP_PENALTY),
    ).message.content
    client = Client(server, verbose=False)
    job = client.submit(QUESTION, [], "", 0, 0.9, 24, api_name="/chat")
    updates = [last_reply(history) for history, _box in job]
    final_history, box = job.result()
    assert box == ""  # the text box is cleared for the next question
    assert final_history[0]["role"] == "user" and text_of(final_history[0]["content"]) == QUESTION
    assert last_reply(final_history) == expected
    assert len(updates) > 1, "the reply should arrive in pieces"
    assert all(b.startswith(a) for a, b in zip(updates, updates[1:]))  # each update grows the last


def test_history_and_system_prompt_reach_the_model(server, small_engine, small_settings):
    from gradio_client import Client

    said = [("user", "My name is Ada."), ("assistant", "Hello Ada!")]
    history = [{"role": role, "content": [{"type": "text", "text": text}]} for role, text in said]  # Gradio's shape
    system = "You are terse."
    expected = small_engine.complete(
        [Message(Role.SYSTEM, system), *(Message(Role(role), text) for role, text in said),
         Message(Role.USER, "What is my name?")],
        options_from(small_settings, temperature=0.0, max_new_tokens=16, repetition_penalty=REP_PENALTY),
    ).message.content
    out, _ = Client(server, verbose=False).predict("What is my name?", history, system, 0, 0.9, 16,
                                                  api_name="/chat")
    assert [m["role"] for m in out] == ["user", "assistant", "user", "assistant"]
    assert last_reply(out) == expected


def test_bad_settings_are_an_error_and_the_server_lives_on(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    with pytest.raises(AppError, match="5.0 is greater than maximum value 2.0"):
        client.predict("Hi", [], "", 5.0, 0.9, 8, api_name="/chat")
    out, _ = client.predict("Hi", [], "", 0, 0.9, 4, api_name="/chat")
    assert last_reply(out)


def test_stop_and_clear_over_http(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    job = client.submit("Write a very long story about a dragon.", [], "", 0, 0.9, 400, api_name="/chat")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 3 and not job.done():
        assert time.monotonic() < deadline, "no streamed output"
        time.sleep(0.05)
    client.predict(api_name="/stop")
    deadline = time.monotonic() + 30
    while not job.done():
        assert time.monotonic() < deadline, "Stop did not end the reply"
        time.sleep(0.05)
    reply = last_reply(job.outputs()[-1][0])
    assert reply and len(reply) < 400  # far short of 400 tokens of story
    # The model is free again at once: the next question is answered.
    out, _ = client.predict(QUESTION, [], "", 0, 0.9, 12, api_name="/chat")
    assert "Paris" in last_reply(out)
    assert client.predict(api_name="/clear") == ([], "")


class CancelSpy:
    """Wraps the real backend and records how each generation ended."""

    def __init__(self, backend) -> None:
        self.backend, self.finished = backend, []
        self.model_name, self.device = backend.model_name, backend.device
        self.context_window = backend.context_window
        self.started = threading.Event()

    def count_tokens(self, messages, tools=None):
        return self.backend.count_tokens(messages, tools)

    def stream(self, messages, options, **kw):
        for ev in self.backend.stream(messages, options, **kw):
            self.started.set()
            if isinstance(ev, Done):
                self.finished.append((ev.finish_reason, ev.usage.completion_tokens))
            yield ev


def test_stop_button_cancels_the_engine_generation(small_backend, small_settings):
    """In-process, so the backend can be watched: Stop ends the generation itself, not just the page."""
    from gradio_client import Client

    from chatglm_core.engine import Engine
    from chatglm_core.web_gradio import WebChat, build_app

    spy = CancelSpy(small_backend)
    app = build_app(WebChat(Engine(spy), small_settings))
    app.queue().launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(app.local_url, verbose=False)
        job = client.submit("Write a very long story about a dragon.", [], "", 0, 0.9, 500, api_name="/chat")
        assert spy.started.wait(60)
        client.predict(api_name="/stop")
        deadline = time.monotonic() + 30
        while not spy.finished:
            assert time.monotonic() < deadline, "the backend kept generating after Stop"
            time.sleep(0.05)
        reason, tokens = spy.finished[0]
        assert reason == "cancelled" and tokens < 500
        job.result(timeout=30)
    finally:
        app.close()


class FailingBackend:
    model_name, device, context_window = "failing", "cpu", 4096

    def count_tokens(self, messages, tools=None):
        return 0

    def stream(self, messages, options, **kw):
        raise GenerationError("out of memory while generating: lower max_new_tokens or use a smaller model")
        yield


def test_engine_errors_show_in_the_page_and_the_server_lives_on(small_settings):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from chatglm_core.engine import Engine
    from chatglm_core.web_gradio import WebChat, build_app

    app = build_app(WebChat(Engine(FailingBackend()), small_settings))
    app.queue().launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(app.local_url, verbose=False)
        for _ in range(2):  # the second request is answered too: nothing crashed
            with pytest.raises(AppError, match="lower max_new_tokens"):
                client.predict("Hi", [], "", 0, 0.9, 8, api_name="/chat")
    finally:
        app.close()


class GatedBackend:
    """Says "one ", then waits until the test opens the gate (or the reply is cancelled)."""

    model_name, device, context_window = "gated", "cpu", 4096

    def __init__(self) -> None:
        self.gate = threading.Event()

    def count_tokens(self, messages, tools=None):
        return 0

    def stream(self, messages, options, *, cancel, **kw):
        yield TextDelta("one ")
        while not (cancel.is_set() or self.gate.is_set()):
            time.sleep(0.01)
        if cancel.is_set():
            yield Done(Message(Role.ASSISTANT, "one "), "cancelled", Usage(0, 1))
            return
        yield TextDelta("two")
        yield Done(Message(Role.ASSISTANT, "one two"), "stop", Usage(0, 2))


def test_stop_in_one_session_leaves_another_alone(small_settings):
    from chatglm_core.engine import Engine
    from chatglm_core.web_gradio import WebChat

    backend = GatedBackend()
    chat = WebChat(Engine(backend), small_settings)
    replies = chat.respond("Count", [], "", 0, 0.9, 16, session="a")
    next(replies)
    chat.stop("b")  # another tab's Stop
    backend.gate.set()
    *_, (history, _) = replies
    assert last_reply(history) == "one two"

    backend.gate.clear()
    replies = chat.respond("Count", [], "", 0, 0.9, 16, session="a")
    next(replies)
    chat.stop("a")
    *_, (history, _) = replies
    assert last_reply(history) == "one " + STOPPED
    assert chat._cancels == {}  # nothing left behind per session


@pytest.mark.parametrize("content, text", [
    ("plain", "plain"),
    ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "ab"),
    ({"type": "text", "text": "c"}, "c"),
    ([{"type": "file", "file": {"path": "/x.png"}}], ""),
    (None, ""),
])
def test_text_of_gradio_content(content, text):
    assert text_of(content) == text


def test_to_messages_skips_thoughts_and_strips_stop_marker():
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
               {"role": "assistant", "content": "Once" + STOPPED},
               {"role": "assistant", "content": "thinking", "metadata": {"title": "tool"}}]
    assert to_messages("  ", history, "Go on") == [Message(Role.USER, "Hi"), Message(Role.ASSISTANT, "Once"),
                                                   Message(Role.USER, "Go on")]
    assert to_messages("Be brief.", [], "Q")[0] == Message(Role.SYSTEM, "Be brief.")


def test_without_gradio_it_says_how_to_install_and_exits_2():
    code = ("import sys; sys.modules['gradio'] = None\n"
            "from chatglm_core.web_gradio import main\n"
            "sys.exit(main(['--port', '7860']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert "needs gradio" in proc.stderr and "pip install -r requirements-gradio.txt" in proc.stderr
    assert "Loading the model" not in proc.stderr  # it stops before the slow part


def test_core_modules_do_not_import_gradio():
    code = ("import importlib, pkgutil, sys, chatglm_core\n"
            "for m in pkgutil.walk_packages(chatglm_core.__path__, 'chatglm_core.'):\n"
            "    if m.name != 'chatglm_core.web_gradio':\n"
            "        importlib.import_module(m.name)\n"
            "print('gradio' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_a_long_history_is_answered_with_a_note(small_backend, small_settings, monkeypatch):
    """Through Gradio's own HTTP API: a history longer than the window still gets a reply, and the
    chat shows a note (a metadata message, which is never sent back to the model)."""
    from gradio_client import Client

    from chatglm_core.engine import Engine
    from chatglm_core.web_gradio import CONTEXT_TITLE, WebChat, build_app

    monkeypatch.setattr(small_backend, "context_window", 512)
    app = build_app(WebChat(Engine(small_backend), small_settings))
    app.queue().launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(app.local_url, verbose=False)
        long_turn = "the quick brown fox jumps over the lazy dog. " * 40
        history = [{"role": r, "content": [{"type": "text", "text": long_turn}]} for r in ("user", "assistant") * 3]
        out, _ = client.predict("Hi", history, "", 0, 0.9, 4, api_name="/chat")
        notes = [h for h in out if (h.get("metadata") or {}).get("title") == CONTEXT_TITLE]
        assert len(notes) == 1 and "no longer sees the 6 earliest messages" in text_of(notes[0]["content"])
        assert out[-1]["role"] == "assistant" and last_reply(out).strip()
        assert len(to_messages("", out, "again")) == 9  # the note is not part of the conversation
    finally:
        app.close()
