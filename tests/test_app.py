"""The Streamlit app through `AppTest`: the real SmolLM2 for replies, a scripted slow model for Stop.

Every test runs main.py (the real entry) with the settings taken from the environment the way
`streamlit run` would: the store goes to a temp dir, the converted GGUF weights come from the
shared test cache so the model is not converted again. Greedy decoding, few tokens.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from chatglm_core.backends import llamacpp
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
                     "CHATGLM_SYSTEM_PROMPT", "CHATGLM_BACKEND", "CHATGLM_GGUF_WEIGHTS"):
            mp.delenv(name, raising=False)
        mp.setenv("CHATGLM_DATA_DIR", str(data))
        mp.setenv("CHATGLM_CACHE_DIR", str(test_data_dir / "cache"))
        mp.setenv("CHATGLM_DEVICE", "cpu")
        # the backend is the default one a user gets: llama.cpp when installed, else transformers
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
    # what the model's load left in memory is out of the cyclic collector's sight (webui/state.py)
    assert gc.get_freeze_count() > 10_000
    assert "SmolLM2-135M-Instruct" in at.sidebar.caption[0].value and "cpu" in at.sidebar.caption[0].value
    # the default a user gets: llama.cpp on the float16 copy when it is installed, else transformers
    assert ("llama.cpp, float16" in at.sidebar.caption[0].value) == llamacpp.available()
    # sampling: the temperature set in the environment (0) wins, top_p is the model card's
    temperature, top_p = at.sidebar.slider(key="gen_temperature"), at.sidebar.slider(key="gen_top_p")
    assert (temperature.value, top_p.value) == (0.0, 0.9)
    assert "(top_p: SmolLM2's model card)" in temperature.help
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


# --- the Tool and Code Interpreter pages (need the agent, tools and sandbox modules) ------------------
def needs(*modules: str) -> None:
    for m in modules:
        pytest.importorskip(m, reason=f"{m} is not merged into this branch yet")


def on_page(page: str, cid: str | None = None) -> AppTest:
    at = new_app(cid)
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def test_tool_page_real_model_reply(app_env):
    needs("chatglm_core.agent", "tools")
    at = on_page("app_pages/tools.py")
    at.sidebar.selectbox(key="tool_choice").set_value("none").run()  # a constrained call is slow on 2 cores
    send(at, "Hello there.")
    assert [n for n, _ in bubbles(at)] == ["user", "assistant"] and bubbles(at)[1][1].strip()


def test_tool_page_calls_observations_toggles_and_manual_mode(app_env, fake_engine, scripted):
    needs("chatglm_core.agent", "tools")
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
    scripted.enqueue(call, "It is 42.")
    fake_engine(scripted)
    at = on_page("app_pages/tools.py")
    assert "calculator" in [c.label for c in at.sidebar.checkbox]
    send(at, "What is 6*7?")
    names = [m.name for m in at.main.chat_message]
    assert names == ["user", "assistant", "observation", "assistant"]
    call_bubble, observation = at.main.chat_message[1], at.main.chat_message[2]
    assert "Calling tool **calculator**" in call_bubble.markdown[0].value
    assert json.loads(call_bubble.code[0].value) == {"expression": "6*7"}
    assert observation.code[0].value == "42"  # the real calculator tool ran
    assert bubbles(at)[-1] == ("assistant", "It is 42.")

    # a disabled tool is not run: the model gets an error result instead
    at.sidebar.checkbox(key="tool_on_calculator").uncheck().run()
    assert not at.session_state["tool_registry"].is_enabled("calculator")
    scripted.enqueue(call, "I could not.")
    send(at, "And 6*7 again?")
    assert "unknown tool 'calculator'" in at.main.chat_message[-2].code[0].value

    # manual mode: the user types the observation, then the model continues with it
    at.sidebar.checkbox(key="tool_on_calculator").check().run()
    at.sidebar.toggle(key="tool_manual").set_value(True).run()
    scripted.enqueue(call, "Thanks, so it is 41.")
    send(at, "One more time: 6*7?")
    assert at.main.text_area(key="observation_text")
    at.main.text_area(key="observation_text").input("41")
    at.main.button[-1].click().run()  # the form's submit button
    assert not at.exception
    assert bubbles(at)[-1] == ("assistant", "Thanks, so it is 41.")
    last = at.session_state["conv_tools"].messages
    assert last[-2].role is Role.TOOL and last[-2].content == "41" and last[-2].name == "calculator"


def test_tool_page_yaml_upload(app_env):
    needs("chatglm_core.agent", "tools")
    at = on_page("app_pages/tools.py")
    manual_tool = ("tools:\n  - name: ask_boss\n    description: Ask the boss.\n    parameters:\n      type: object\n"
                   "      properties: {q: {type: string}}\n    manual: true\n")
    at.sidebar.text_area(key="tools_yaml").input(manual_tool).run()
    at.sidebar.button(key="tools_reload").click().run()
    assert "ask_boss" in [c.label for c in at.sidebar.checkbox]
    assert any("Loaded 1 tool(s): ask_boss" in s.value for s in at.sidebar.success)
    python_tool = manual_tool.replace("manual: true", "python: os:system")
    at.sidebar.text_area(key="tools_yaml").input(python_tool).run()
    at.sidebar.button(key="tools_reload").click().run()
    assert any("'python:'" in e.value for e in at.sidebar.error)
    assert at.session_state["tool_registry"].get("ask_boss").manual  # the failed reload changed nothing
    other = on_page("app_pages/tools.py")  # another session: its own registry
    assert "ask_boss" not in [c.label for c in other.sidebar.checkbox]


def test_interpreter_page_real_model_reply(app_env):
    needs("chatglm_core.agent", "chatglm_core.sandbox_pool")
    at = on_page("app_pages/code_interpreter.py")
    send(at, "Hi!")
    assert bubbles(at)[0] == ("user", "Hi!") and len(bubbles(at)) >= 2


def test_interpreter_page_code_outputs_images_and_rerun(app_env, fake_engine, scripted):
    needs("chatglm_core.agent", "chatglm_core.sandbox_pool")
    plot = ("import matplotlib.pyplot as plt\n"
            "plt.plot([1, 2, 3]); plt.savefig('plot.png'); plt.show()\nprint('drawn')")
    scripted.enqueue(f"Plotting.\n```python\n{plot}\n```", "Here is the plot.")
    fake_engine(scripted)
    at = on_page("app_pages/code_interpreter.py")
    send(at, "Plot 1 2 3.")
    names = [m.name for m in at.main.chat_message]
    assert names == ["user", "assistant", "observation", "assistant"], names
    code_bubble, observation = at.main.chat_message[1], at.main.chat_message[2]
    assert code_bubble.code[0].value == plot
    assert "drawn" in observation.code[0].value
    assert len(observation.get("image")) == 1  # the figure, shown as an image
    assert any(b.label.replace("\\", "").startswith("plot.png") for b in at.sidebar.download_button)  # written by the code

    # edit the code and re-run it: the kernel runs the new cell, the model continues from its output
    scripted.enqueue("Now it prints 7.")
    at.main.text_area[0].input("print(3 + 4)")
    at.main.button[0].click().run()
    assert not at.exception
    messages = at.session_state["conv_interpreter"].messages
    assert messages[1].tool_calls[0].code == "print(3 + 4)"
    assert messages[2].content == "7"
    assert bubbles(at)[-1] == ("assistant", "Now it prints 7.")
    at.sidebar.button(key="kernel_restart").click().run()
    assert not at.exception


# --- issue 18: the app in real use --------------------------------------------------------------------
def sidebar_keys(at: AppTest) -> list[str]:
    return [b.key for b in at.sidebar.button]


def stored(app_env: Path, cid: str, conv_id: str):
    return ConversationStore(app_env / "conversations.sqlite3").get(cid, conv_id)


def test_clear_open_and_delete_show_in_the_same_run_and_can_be_undone(app_env, fake_engine, scripted):
    scripted.enqueue("Dragons fly.", "Pancakes need eggs.")
    fake_engine(scripted)
    at = send(new_app(), "Tell me about dragons.")
    cid, first = at.query_params["cid"], at.session_state["conv_chat"].id
    at.button(key="new_conv").click().run()
    send(at, "A pancake recipe.")
    second = at.session_state["conv_chat"].id

    at.button(key=f"open_{first}").click().run()  # the list marks the opened one in this very run
    assert at.button(key=f"open_{first}").label.startswith("▶")
    assert not at.button(key=f"open_{second}").label.startswith("▶")
    assert bubbles(at)[0] == ("user", "Tell me about dragons.")

    at.button(key="clear_conv").click().run()
    assert bubbles(at) == [] and stored(app_env, cid, first) is None
    assert f"open_{first}" not in sidebar_keys(at)  # gone from the list at once
    assert at.button(key="regenerate").disabled  # nothing to retry or edit
    assert "Edit last message" not in [e.label for e in at.sidebar.expander]
    assert any("Deleted" in c.value and "dragons" in c.value for c in at.sidebar.caption)

    at.button(key="undo_chat").click().run()  # undo: back, current, stored again
    assert bubbles(at)[0] == ("user", "Tell me about dragons.")
    assert at.button(key=f"open_{first}").label.startswith("▶")
    assert [m.content for m in stored(app_env, cid, first).messages] == ["Tell me about dragons.", "Dragons fly."]
    assert "undo_chat" not in sidebar_keys(at)

    at.button(key=f"del_{second}").click().run()  # deleting another one leaves the current one open
    assert f"open_{second}" not in sidebar_keys(at) and stored(app_env, cid, second) is None
    assert bubbles(at)[0] == ("user", "Tell me about dragons.")
    at.button(key="undo_chat").click().run()
    assert f"open_{second}" in sidebar_keys(at) and stored(app_env, cid, second) is not None
    assert at.button(key=f"open_{first}").label.startswith("▶")


def test_settings_and_system_prompt_are_kept_with_the_conversation(app_env, fake_engine, scripted):
    scripted.enqueue("Bonjour.")
    fake_engine(scripted)
    at = new_app()
    at.sidebar.slider(key="gen_temperature").set_value(0.35)
    at.sidebar.number_input(key="gen_max_new_tokens").set_value(99)
    at.sidebar.text_area(key="system_chat").input("Answer in French.")
    send(at, "Hello.")
    assert scripted.calls[0][0] == Message(Role.SYSTEM, "Answer in French.")
    cid = at.query_params["cid"]

    again = new_app(cid)  # a refresh: the conversation comes back with its settings
    assert again.sidebar.slider(key="gen_temperature").value == 0.35
    assert again.sidebar.number_input(key="gen_max_new_tokens").value == 99
    assert again.sidebar.text_area(key="system_chat").value == "Answer in French."
    again.button(key="new_conv").click().run()  # a new conversation starts from the current values
    again.sidebar.slider(key="gen_temperature").set_value(0.9).run()
    again.button(key=f"open_{at.session_state['conv_chat'].id}").click().run()  # reopening restores them
    assert again.sidebar.slider(key="gen_temperature").value == 0.35

    exported = json.loads(_export_json(again))
    assert exported["system"] == "Answer in French."
    assert exported["settings"]["temperature"] == 0.35 and exported["settings"]["max_new_tokens"] == 99
    other = new_app()  # another browser imports it: the system prompt and settings come along
    other.sidebar.file_uploader(key="import_chat").upload("conv.json", json.dumps(exported).encode(),
                                                          "application/json").run()
    assert other.sidebar.text_area(key="system_chat").value == "Answer in French."
    assert other.sidebar.slider(key="gen_temperature").value == 0.35
    assert bubbles(other) == bubbles(at)


class CutBackend(SlowBackend):
    """Five words, then the max new tokens limit."""

    def __init__(self) -> None:
        super().__init__(words=5, delay=0.01)

    def stream(self, messages, options, *, tools=None, interpreter=False, cancel=None):
        for ev in super().stream(messages, options, tools=tools, interpreter=interpreter, cancel=cancel):
            yield Done(ev.message, "length", Usage(1, 5)) if isinstance(ev, Done) else ev


def test_each_reply_says_how_it_ended_and_shows_its_stats(app_env, fake_engine):
    fake_engine(CutBackend())
    at = new_app()
    at.sidebar.number_input(key="gen_max_new_tokens").set_value(5)
    send(at, "Tell me everything.")

    def captions(app):
        return [c.value for c in app.main.caption]

    assert any("cut at the max new tokens limit (5)" in c for c in captions(at))
    stats = [c for c in captions(at) if "tokens/s" in c]
    assert len(stats) == 1 and "5 tokens" in stats[0] and "first token" in stats[0]
    reply = stored(app_env, at.query_params["cid"], at.session_state["conv_chat"].id).messages[1]
    assert reply.meta["finish"] == "length" and reply.meta["tokens"] == 5 and reply.meta["tok_s"] > 0
    assert reply.meta["ttft_s"] >= 0

    again = new_app(at.query_params["cid"])  # saved with the message: a refresh shows the same
    assert any("cut at the max new tokens limit" in c for c in captions(again))
    assert any("5 tokens" in c for c in captions(again))
    again.sidebar.toggle(key="show_reply_stats").set_value(False).run()  # hidden on request; the cut note stays
    assert not any("tokens/s" in c for c in captions(again))
    assert any("cut at the max new tokens limit" in c for c in captions(again))


def test_the_search_box_finds_conversations_by_title_and_text_and_opens_them(app_env, fake_engine, scripted):
    scripted.enqueue("Dragons fly over Lyon.", "Flour, eggs and milk.")
    fake_engine(scripted)
    at = send(new_app(), "Tell me about dragons.")
    dragons = at.session_state["conv_chat"].id
    at.button(key="new_conv").click().run()
    send(at, "A pancake recipe.")
    pancakes = at.session_state["conv_chat"].id

    at.sidebar.text_input(key="conv_search_chat").input("eggs").run()  # a word of a reply
    assert [k for k in sidebar_keys(at) if k.startswith("open_")] == [f"open_{pancakes}"]
    at.sidebar.text_input(key="conv_search_chat").input("drag").run()  # the start of a title word
    assert [k for k in sidebar_keys(at) if k.startswith("open_")] == [f"open_{dragons}"]
    at.button(key=f"open_{dragons}").click().run()
    assert bubbles(at) == [("user", "Tell me about dragons."), ("assistant", "Dragons fly over Lyon.")]
    at.sidebar.text_input(key="conv_search_chat").input("unicorns").run()
    assert any("No conversation matches" in c.value for c in at.sidebar.caption)


def test_a_partial_reply_is_in_the_store_while_it_streams(app_env, fake_engine):
    # However the run ends (a page switch, a closed tab, a killed server), what was shown is saved.
    backend = SlowBackend(words=400, delay=0.02)
    fake_engine(backend)
    at = new_app()
    cid = at.query_params["cid"]
    errors: list[BaseException] = []

    def run_send() -> None:
        try:
            send(at, "Count for me.")
        except BaseException as e:  # reported below
            errors.append(e)

    runner = threading.Thread(target=run_send, daemon=True)
    runner.start()
    store = ConversationStore(app_env / "conversations.sqlite3")
    deadline = time.monotonic() + 60
    saved = None
    while time.monotonic() < deadline and backend.sent < backend.words:
        past = store.list(cid, "chat")
        if past and len(past[0].messages) == 2 and past[0].messages[1].content:
            saved = past[0].messages[1]
            break
        time.sleep(0.05)
    assert saved is not None and backend.sent < backend.words, "the partial reply was not saved while streaming"
    assert saved.content.startswith("w0 w1") and saved.meta["finish"] == "stopped"  # what it is if nothing follows
    click_during_stream(backend, after_tokens=0).join(5)  # end the run
    runner.join(30)
    assert not errors, errors


def test_a_reply_cut_by_a_stop_request_is_saved_with_its_stopped_state(app_env, fake_engine):
    # With runner.fastReruns (the default) a page switch or any click during a reply sends the running
    # script a STOP request; from then on every session-state access in that run raises StopException.
    from streamlit.runtime.scriptrunner_utils.script_run_context_attr import SCRIPT_RUN_CONTEXT_ATTR_NAME

    backend = SlowBackend(words=400, delay=0.02)
    fake_engine(backend)
    at = new_app()

    def stop_request() -> None:
        while backend.sent < 5:
            time.sleep(0.01)
        for t in threading.enumerate():
            ctx = getattr(t, SCRIPT_RUN_CONTEXT_ATTR_NAME, None)
            if ctx is not None and ctx.script_requests is not None:
                ctx.script_requests.request_stop()
                return

    stopper = threading.Thread(target=stop_request, daemon=True)
    stopper.start()
    at.chat_input(key="input_chat").set_value("Count for me.").run()
    stopper.join(5)
    assert backend.cancelled.wait(5), "the engine never saw the cancel event"
    saved = ConversationStore(app_env / "conversations.sqlite3").list(at.query_params["cid"], "chat")[0].messages
    assert [m.role for m in saved] == [Role.USER, Role.ASSISTANT]
    assert saved[1].content.startswith("w0 w1 w2 w3 w4") and saved[1].meta["finish"] == "stopped"
    again = new_app(at.query_params["cid"])  # a refresh shows it, stopped
    assert bubbles(again)[1] == ("assistant", saved[1].content)
    assert any("stopped" in c.value for c in again.main.caption)


def test_a_pending_manual_observation_survives_a_refresh(app_env, fake_engine, scripted):
    needs("chatglm_core.agent", "tools")
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
    scripted.enqueue(call, "So it is 41.")
    fake_engine(scripted)
    at = on_page("app_pages/tools.py")
    at.sidebar.toggle(key="tool_manual").set_value(True).run()
    send(at, "What is 6*7?")
    assert at.main.text_area(key="observation_text")

    again = on_page("app_pages/tools.py", at.query_params["cid"])  # a refresh while the call waits
    assert again.main.text_area(key="observation_text")
    assert again.chat_input(key="input_tools").disabled
    again.sidebar.toggle(key="tool_manual").set_value(True).run()
    again.main.text_area(key="observation_text").input("41")
    again.main.button[-1].click().run()
    assert not again.exception
    assert bubbles(again)[-1] == ("assistant", "So it is 41.")
    messages = stored(app_env, again.query_params["cid"], again.session_state["conv_tools"].id).messages
    assert messages[-2].role is Role.TOOL and messages[-2].content == "41"


def test_tool_page_mcp_servers_warnings_images_and_uploads(app_env, fake_engine, scripted, monkeypatch, tmp_path):
    """The app's tools file names a working MCP server and one that crashes: the page lists the first's
    tools, warns about the second by name, and shows a tool result's image. From the browser, a
    command server is refused and an unreachable URL server is a warning."""
    needs("chatglm_core.agent", "tools")
    from webui import state, tools_panel

    server = Path(__file__).with_name("mcp_test_server.py")
    app_file = tmp_path / "app-tools.yaml"
    app_file.write_text(f"mcp:\n  - {{name: t, command: [python, {server}]}}\n"
                        f"  - {{name: crash, command: [python, {server}, --crash-at-start]}}\n")
    monkeypatch.setenv("CHATGLM_TOOLS", str(app_file))
    state.settings.clear()
    tools_panel.base_registry.clear()
    try:
        scripted.enqueue('<tool_call>{"name": "picture", "arguments": {}}</tool_call>', "A red dot.")
        fake_engine(scripted)
        at = on_page("app_pages/tools.py")
        assert {"echo", "picture", "calculator"} <= {c.label for c in at.sidebar.checkbox}
        assert any("MCP server 'crash' failed to start" in w.value and "missing configuration" in w.value
                   for w in at.sidebar.warning)
        send(at, "Show me the picture.")
        observation = at.main.chat_message[2]
        assert observation.code[0].value == "a red dot\n[Image 1: image/png]\na note"
        assert [type(c).__name__ for c in observation.children.values()].count("Image") == 1  # shown too

        at.sidebar.text_area(key="tools_yaml").input(f"mcp:\n  - {{name: x, command: [python, {server}]}}\n").run()
        at.sidebar.button(key="tools_reload").click().run()
        assert any("'command:'" in e.value for e in at.sidebar.error)
        at.sidebar.text_area(key="tools_yaml").input("mcp:\n  - {name: web, url: 'http://127.0.0.1:9/mcp'}\n").run()
        at.sidebar.button(key="tools_reload").click().run()
        assert not at.exception
        assert any("MCP server 'web' failed to start" in w.value for w in at.sidebar.warning)
        assert "echo" in {c.label for c in at.sidebar.checkbox}  # the app's servers keep working
    finally:
        tools_panel.base_registry().close_mcp()
        tools_panel.base_registry.clear()
        monkeypatch.delenv("CHATGLM_TOOLS")
        state.settings.clear()
