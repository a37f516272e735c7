"""The Streamlit app through `AppTest`: the real SmolLM2 for replies, a scripted slow model for Stop.

Every test runs main.py (the real entry) with the settings taken from the environment the way
`streamlit run` would: the store goes to a temp dir, the converted GGUF weights come from the
shared test cache so the model is not converted again. Greedy decoding, few tokens.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from chatglm_core.engine import Engine
from chatglm_core.errors import ConfigError, GenerationError
from chatglm_core.messages import Done, Message, Role, TextDelta, Usage
from chatglm_core.store import ConversationStore

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180


@pytest.fixture(scope="module")
def app_env(tmp_path_factory, test_data_dir):
    from webui import state

    data = tmp_path_factory.mktemp("app-data")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MODEL_PATH", "CHATGLM_MODEL_PATH", "CHATGLM_REMOTE_BASE_URL", "CHATGLM_TOOLS",
                     "CHATGLM_SYSTEM_PROMPT"):
            mp.delenv(name, raising=False)
        mp.setenv("CHATGLM_DATA_DIR", str(data))
        mp.setenv("CHATGLM_CACHE_DIR", str(test_data_dir / "cache"))
        mp.setenv("CHATGLM_DEVICE", "cpu")
        mp.setenv("CHATGLM_BACKEND", "transformers")
        mp.setenv("CHATGLM_TEMPERATURE", "0")
        mp.setenv("CHATGLM_MAX_NEW_TOKENS", "8")
        state.settings.clear()
        state.store.clear()
        state._engine_or_error.clear()
        yield data
    state.settings.clear()
    state.store.clear()
    state._engine_or_error.clear()


@pytest.fixture
def fake_engine(app_env, monkeypatch):
    """Install an engine over `backend` in place of the real model for one test."""
    from webui import state

    def install(backend):
        engine = Engine(backend)
        monkeypatch.setattr(state, "build_engine", lambda settings: engine)
        state._engine_or_error.clear()
        return engine

    yield install
    state._engine_or_error.clear()  # the next test loads the real model again


def new_app(cid: str | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "main.py"), default_timeout=TIMEOUT)
    if cid:
        at.query_params["cid"] = cid
    return at.run()


def send(at: AppTest, text: str) -> AppTest:
    at.chat_input(key=f"input_{at.session_state['mode']}").set_value(text).run()
    assert not at.exception, at.exception
    return at


def bubbles(at: AppTest) -> list[tuple[str, str]]:
    return [(m.name, "".join(md.value for md in m.markdown)) for m in at.main.chat_message]


def greedy_reply(text: str) -> str:
    """What the app's engine answers to `text` alone, with the app's test settings."""
    from chatglm_core.chat import options_from
    from webui import state

    engine, error = state._engine_or_error()
    assert error is None, error
    return engine.complete([Message(Role.USER, text)], options_from(state.settings())).message.content


# --- the real model ------------------------------------------------------------------------------
def test_chat_streams_the_real_models_reply(app_env):
    at = new_app()
    assert not at.exception and not at.error
    assert "SmolLM2-135M-Instruct" in at.sidebar.caption[0].value and "cpu" in at.sidebar.caption[0].value
    send(at, "What is the capital of France?")
    expected = greedy_reply("What is the capital of France?")
    assert expected.strip()
    assert bubbles(at) == [("user", "What is the capital of France?"), ("assistant", expected)]
    stored = ConversationStore(app_env / "conversations.sqlite3").list(at.query_params["cid"], "chat")
    assert [m.content for m in stored[0].messages] == ["What is the capital of France?", expected]


def test_regenerate_edit_and_clear(app_env):
    at = send(new_app(), "Name a color.")
    first = bubbles(at)
    at.button(key="regenerate").click().run()
    assert bubbles(at) == first  # greedy: the same reply again, not a second one appended
    at.sidebar.text_area[-1].set_value("Name an animal.")
    at.button(key="edit_regenerate").click().run()
    assert bubbles(at) == [("user", "Name an animal."), ("assistant", greedy_reply("Name an animal."))]
    cid = at.query_params["cid"]
    at.button(key="clear_conv").click().run()
    assert bubbles(at) == []
    assert ConversationStore(app_env / "conversations.sqlite3").list(cid, "chat") == []


def test_a_refresh_finds_the_conversation_and_past_ones_reopen(app_env):
    at = send(new_app(), "Say hi.")
    cid = at.query_params["cid"]
    shown = bubbles(at)
    again = new_app(cid)  # a new browser session with the same URL: a refresh
    assert bubbles(again) == shown
    again.button(key="new_conv").click().run()
    assert bubbles(again) == []
    conv_id = ConversationStore(app_env / "conversations.sqlite3").list(cid, "chat")[0].id
    again.button(key=f"open_{conv_id}").click().run()
    assert bubbles(again) == shown
    again.button(key=f"del_{conv_id}").click().run()
    assert bubbles(again) == []
    assert ConversationStore(app_env / "conversations.sqlite3").get(cid, conv_id) is None


def test_sessions_and_modes_keep_separate_histories(app_env):
    alice, bob = new_app(), new_app()
    assert alice.query_params["cid"] != bob.query_params["cid"]
    send(alice, "I am Alice.")
    send(bob, "I am Bob.")
    assert bubbles(alice)[0] == ("user", "I am Alice.")
    assert bubbles(bob)[0] == ("user", "I am Bob.")
    for page in ("app_pages/tools.py", "app_pages/code_interpreter.py"):
        alice.switch_page(page).run()
        assert not alice.exception
        assert bubbles(alice) == []  # each mode has its own conversation
    alice.switch_page("app_pages/chat.py").run()
    assert bubbles(alice)[0] == ("user", "I am Alice.")


def test_export_and_import(app_env):
    at = send(new_app(), "Export me.")
    buttons = {b.label: b for b in at.sidebar.download_button}
    assert not buttons["Download JSON"].disabled and not buttons["Download Markdown"].disabled
    exported = json.loads(_export_json(at))  # the text the JSON button serves
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    other = new_app()
    other.sidebar.file_uploader(key="import_chat").upload("conv.json", json.dumps(exported).encode(),
                                                          "application/json").run()
    assert bubbles(other) == bubbles(at)
    other.sidebar.file_uploader(key="import_chat").upload("bad.json", b"{not json", "application/json").run()
    assert any("Could not import bad.json" in e.value for e in other.sidebar.error)
    assert bubbles(other) == bubbles(at)  # a bad file changes nothing


def _export_json(at: AppTest) -> str:
    from chatglm_core.store import conversation_to_json

    return conversation_to_json(at.session_state["conv_chat"])


# --- scripted models: stop, errors, unsafe output -------------------------------------------------
class SlowBackend:
    """Streams one word every `delay` seconds; records whether it saw the cancel event."""

    model_name = "slow-scripted"
    device = "cpu"
    context_window = 4096

    def __init__(self, words: int = 200, delay: float = 0.05) -> None:
        self.words, self.delay = words, delay
        self.sent = 0
        self.cancelled = threading.Event()

    def count_tokens(self, messages, tools=None) -> int:
        return 1

    def stream(self, messages, options, *, tools=None, interpreter=False, cancel=None):
        text = ""
        for i in range(self.words):
            if cancel is not None and cancel.is_set():
                self.cancelled.set()
                yield Done(Message(Role.ASSISTANT, text), "cancelled", Usage(1, i))
                return
            time.sleep(self.delay)
            text += f"w{i} "
            self.sent = i + 1
            yield TextDelta(f"w{i} ")
        yield Done(Message(Role.ASSISTANT, text), "stop", Usage(1, self.words))


def click_during_stream(backend: SlowBackend, after_tokens: int) -> threading.Thread:
    """What a click does while the script streams: ask the running script for a rerun."""
    from streamlit.runtime.scriptrunner import RerunData
    from streamlit.runtime.scriptrunner_utils.script_run_context_attr import SCRIPT_RUN_CONTEXT_ATTR_NAME

    def click() -> None:
        while backend.sent < after_tokens:
            time.sleep(0.01)
        for t in threading.enumerate():
            ctx = getattr(t, SCRIPT_RUN_CONTEXT_ATTR_NAME, None)
            if ctx is not None and ctx.script_requests is not None:
                ctx.script_requests.request_rerun(RerunData())
                return

    thread = threading.Thread(target=click, daemon=True)
    thread.start()
    return thread


def test_stop_cancels_the_engine_and_keeps_the_partial_reply(app_env, fake_engine):
    backend = SlowBackend()
    fake_engine(backend)
    at = new_app()
    clicker = click_during_stream(backend, after_tokens=5)
    send(at, "Count for me.")
    clicker.join(5)
    assert backend.cancelled.wait(5), "the engine never saw the cancel event"
    time.sleep(0.2)
    assert backend.sent < backend.words  # the model stopped producing tokens
    (user, assistant) = at.session_state["conv_chat"].messages
    assert user.content == "Count for me."
    assert assistant.content.startswith("w0 w1 w2 w3 w4") and len(assistant.content.split()) < backend.words
    assert bubbles(at)[1] == ("assistant", assistant.content)
    assert any("stopped" in c.value for c in at.main.caption)
    stored = ConversationStore(app_env / "conversations.sqlite3").list(at.query_params["cid"], "chat")
    assert stored[0].messages[1].content == assistant.content


def test_html_in_a_reply_is_shown_as_text(app_env, fake_engine, scripted):
    scripted.enqueue('<script>alert(1)</script> and <img src=x onerror="alert(2)"> and `<b>code</b>`')
    fake_engine(scripted)
    at = send(new_app(), "Say something dangerous.")
    shown = bubbles(at)[1][1]
    assert "<script>" not in shown and "<img" not in shown
    assert "&lt;script>alert(1)&lt;/script>" in shown and "`<b>code</b>`" in shown


def test_a_generation_error_is_a_message_and_the_app_goes_on(app_env, fake_engine, scripted):
    class Failing(type(scripted)):
        def stream(self, *a, **kw):
            raise GenerationError("out of memory while generating: lower max_new_tokens")
            yield  # a generator

    failing = Failing()
    fake_engine(failing)
    at = send(new_app(), "Hello?")
    assert any("out of memory" in e.value for e in at.error)
    assert bubbles(at) == [("user", "Hello?")]
    failing.stream = scripted.enqueue("Better now.").stream  # the next message works again
    send(at, "Again?")
    assert bubbles(at)[-1] == ("assistant", "Better now.")


def test_a_model_that_fails_to_load_shows_what_to_do(app_env, monkeypatch):
    from webui import state

    def broken(settings):
        raise ConfigError("MODEL_PATH /nope does not exist: point it at an HF folder or a .gguf file")

    monkeypatch.setattr(state, "build_engine", broken)
    state._engine_or_error.clear()
    try:
        at = new_app()
        assert not at.exception
        assert "failed to load" in at.error[0].value and "/nope" in at.error[0].value
        assert at.chat_input(key="input_chat").disabled
        assert at.button(key="retry_engine")
        monkeypatch.undo()
        at.button(key="retry_engine").click().run()
        assert not at.error and "SmolLM2" in at.sidebar.caption[0].value
    finally:
        state._engine_or_error.clear()
