"""The app with conversations longer than the context window, interrupted cells and the small
page fixes of issue 18, through `AppTest` (main.py, the real kernel, a scripted model whose
"tokens" are words so the window can be small)."""

from __future__ import annotations

import threading
import time

from conftest import ScriptedBackend
from test_app import app_env, bubbles, click_during_stream, fake_engine, new_app, on_page, send  # noqa: F401

from chatglm_core.errors import GenerationError
from chatglm_core.messages import Role
from chatglm_core.store import ConversationStore

NOTICE = "The model no longer sees the"
CUT = "Too long for the model's context window"


def small_window(words: int) -> ScriptedBackend:
    backend = ScriptedBackend()
    backend.context_window = words  # the app's test settings leave 8 tokens for the reply
    return backend


def infos(at) -> list[str]:
    return [i.value for i in at.main.info]


def test_a_message_too_long_is_cut_and_later_left_out(app_env, fake_engine):
    scripted = small_window(40)
    fake_engine(scripted)
    at = new_app()
    long_message = " ".join(f"word{i}" for i in range(100))
    scripted.enqueue("That is long.")
    send(at, long_message)
    (seen,) = scripted.calls[-1]
    assert "characters cut here" in seen.content and seen.content.startswith("word0 word1")
    assert len(seen.content.split()) <= 32
    assert bubbles(at) == [("user", long_message), ("assistant", "That is long.")]  # the page keeps it whole
    assert any(CUT in c.value for c in at.main.caption)

    scripted.enqueue("Hello!")
    send(at, "Hi")
    assert [m.content for m in scripted.calls[-1]] == ["Hi"]  # the model sees only the newest turn
    assert bubbles(at)[-1] == ("assistant", "Hello!")
    (notice,) = [i for i in infos(at) if NOTICE in i]
    assert "the 2 earliest messages" in notice and "40 tokens" in notice and "above this note" in notice


def test_a_long_tool_conversation_keeps_calls_with_their_observations(app_env, fake_engine):
    scripted = small_window(60)
    fake_engine(scripted)
    at = on_page("app_pages/tools.py")
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
    for i in range(4):
        scripted.enqueue(call, "It is 42 " + "and more " * 6)
        send(at, f"Question {i}: " + "what is six times seven " * 3)
    first, last = scripted.calls[-2:]  # the newest turn's two rounds: before and after its tool call
    assert first[-1].content.startswith("Question 3") and last[-1].role is Role.TOOL
    for seen in (first, last):  # whole turns: a user message first, the oldest turns left out
        assert seen[0].role is Role.USER and not any(m.content.startswith(("Question 0", "Question 1")) for m in seen)
    for i, m in enumerate(last):  # every observation still follows its call
        if m.role is Role.TOOL:
            assert last[i - 1].tool_calls and last[i - 1].tool_calls[0].id == m.tool_call_id
    assert any(NOTICE in i for i in infos(at))
    assert bubbles(at)[-1][1].startswith("It is 42")


def test_a_generation_error_takes_the_stop_button_away(app_env, fake_engine):
    class Failing(ScriptedBackend):
        def stream(self, *a, **kw):
            raise GenerationError("out of memory while generating: lower max_new_tokens")
            yield  # a generator

    fake_engine(Failing())
    at = send(new_app(), "Hello?")
    assert any("out of memory" in e.value for e in at.error)
    assert not [b for b in at.button if b.key == "stop"]


# --- the Code Interpreter ---------------------------------------------------------------------------
SPIN = "open('spinning.flag', 'w').close()\nwhile True:\n    pass"


def wait_for_file(root, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(root.rglob(name)):
        assert time.monotonic() < deadline, f"{name} never appeared"
        time.sleep(0.05)


def test_interrupting_a_running_cell_ends_it_with_an_observation(app_env, fake_engine):
    scripted = ScriptedBackend()
    fake_engine(scripted)
    at = on_page("app_pages/code_interpreter.py")
    scripted.enqueue(f"Spinning.\n```python\n{SPIN}\n```")

    class Clicker:  # click_during_stream's trigger: the cell has started spinning
        sent = 0

    clicker = Clicker()
    # the kernel pool is process-wide: in a full run its kernel works under an earlier test's data dir,
    # so look under every test's temporary folder (pytest's base temp), not just this test's
    threading.Thread(target=lambda: (wait_for_file(app_env.parent, "spinning.flag"), setattr(clicker, "sent", 1)),
                     daemon=True).start()
    click = click_during_stream(clicker, after_tokens=1)  # a click (Stop, Interrupt) asks for a rerun
    send(at, "Spin forever.")
    click.join(60)
    at.run()  # AppTest hands back the run the click cut short: draw the page again, as the browser shows it
    assert not at.exception, at.exception
    messages = at.session_state["conv_interpreter"].messages
    assert [m.role for m in messages] == [Role.USER, Role.ASSISTANT, Role.TOOL]
    assert messages[2].content.startswith("Interrupted: the user stopped this code cell")
    assert messages[2].tool_call_id == messages[1].tool_calls[0].id
    observation = at.main.chat_message[2]
    assert observation.name == "observation" and "Interrupted" in observation.code[0].value
    captions = [c.value for c in at.main.caption]
    assert not any("Running code" in c for c in captions) and any("Ran code" in c for c in captions)
    stored = ConversationStore(app_env / "conversations.sqlite3").list(at.query_params["cid"], "interpreter")
    assert stored[0].messages[2].content == messages[2].content  # kept in history

    # the kernel was really interrupted: the next cell runs, and the model read the interruption
    scripted.enqueue("```python\nprint(6 * 7)\n```", "42.")
    send(at, "Now compute 6*7.")
    assert at.session_state["conv_interpreter"].messages[-2].content == "42"
    assert any(m.content.startswith("Interrupted") for m in scripted.calls[-2])


def test_interpreter_page_files_images_and_wrapping(app_env, fake_engine):
    scripted = ScriptedBackend()
    fake_engine(scripted)
    at = on_page("app_pages/code_interpreter.py")
    code = ("import os, matplotlib.pyplot as plt\n"
            "os.makedirs('.cache/fontconfig', exist_ok=True); open('.cache/fontconfig/x.cache-9', 'w').close()\n"
            "os.makedirs('__pycache__', exist_ok=True); open('__pycache__/m.pyc', 'w').close()\n"
            "plt.plot([1, 2]); plt.savefig('plot.png'); plt.show()\nprint('a' * 300)")
    scripted.enqueue(f"```python\n{code}\n```", "Done.")
    send(at, "Plot.")
    messages = at.session_state["conv_interpreter"].messages
    assert messages[2].content.endswith("[Image]")  # the model reads where the image was…
    observation = at.main.chat_message[2]
    assert "[Image]" not in observation.code[0].value and len(observation.get("image")) == 1  # …the page shows it
    assert observation.code[0].proto.wrap_lines  # a long line wraps instead of scrolling sideways
    labels = [b.label.replace("\\", "") for b in at.sidebar.download_button]
    assert any(label.startswith("plot.png") for label in labels)
    assert not any(".cache" in label or "pycache" in label for label in labels), labels


def test_edit_and_rerun_is_not_offered_over_the_running_cell(app_env, fake_engine):
    class FailsAfterTheCell(ScriptedBackend):
        fail = False

        def stream(self, *a, **kw):
            if self.fail:
                raise GenerationError("the model is gone")
            yield from super().stream(*a, **kw)

    scripted = FailsAfterTheCell()
    fake_engine(scripted)
    at = on_page("app_pages/code_interpreter.py")
    scripted.enqueue("```python\nprint(1)\n```", "One.")
    send(at, "Print one.")
    assert [b for b in at.main.button if b.key.startswith("rerun_")]  # offered on a finished turn
    scripted.fail = True  # the turn of the re-run stays on screen (no rerun after an error)
    at.main.text_area[0].input("print(3 + 4)")
    at.main.button[0].click().run()
    assert at.session_state["conv_interpreter"].messages[2].content == "7"
    assert any("the model is gone" in e.value for e in at.error)
    assert not [b for b in at.main.button if b.key.startswith("rerun_")]  # the popover is gone while it runs


def test_an_uploaded_tools_yaml_says_press_load(app_env):
    at = on_page("app_pages/tools.py")
    yaml_text = ("tools:\n  - name: ask_boss\n    description: Ask the boss.\n    parameters:\n      type: object\n"
                 "      properties: {q: {type: string}}\n    manual: true\n")
    at.sidebar.file_uploader(key="tools_upload").set_value(("boss.yaml", yaml_text.encode(), "application/x-yaml"))
    at.run()
    assert at.sidebar.text_area(key="tools_yaml").value == yaml_text
    assert "ask_boss" not in [c.label for c in at.sidebar.checkbox]  # filled in, not loaded
    assert any("press **Load / reload**" in i.value and "boss" in i.value for i in at.sidebar.info)
    at.sidebar.button(key="tools_reload").click().run()
    assert "ask_boss" in [c.label for c in at.sidebar.checkbox]
    assert not any("press **Load" in i.value for i in at.sidebar.info)


def test_an_edited_cell_with_huge_output_is_capped_in_tokens(app_env, fake_engine):
    scripted = ScriptedBackend()  # a 4,096-token window: at most 1,024 tokens (about 4 characters each) of output
    fake_engine(scripted)
    at = on_page("app_pages/code_interpreter.py")
    scripted.enqueue("```python\nprint(1)\n```", "One.")
    send(at, "Print one.")
    scripted.enqueue("Many x.")
    at.main.text_area[0].input("print('x' * 5_000_000)")
    at.main.button[0].click().run()
    observation = at.session_state["conv_interpreter"].messages[2].content
    assert "output truncated" in observation and len(observation) // 4 + 1 <= 1024
    assert scripted.calls[-1][-1].content == observation


def test_the_notice_goes_when_the_conversation_fits_again(app_env, fake_engine):
    scripted = small_window(40)  # 32 "tokens" (words) for the prompt
    fake_engine(scripted)
    at = new_app()
    scripted.enqueue("Long reply here.", "Trimmed.", "Short now.")
    send(at, " ".join(f"word{i}" for i in range(20)))  # 20
    send(at, "tell me more about all of that and then some more please")  # 20 + 3 + 12 = 35: the first turn leaves
    assert len(scripted.calls[-1]) == 1 and any(NOTICE in i for i in infos(at))
    conv = at.session_state["conv_chat"]
    at.sidebar.text_area(key=f"edit_last_{conv.id}_{len(conv.messages)}").input("Hi")
    at.sidebar.button(key="edit_regenerate").click().run()  # 20 + 3 + 1 = 24: everything fits again…
    assert len(scripted.calls[-1]) == 3 and bubbles(at)[-1] == ("assistant", "Short now.")
    assert not any(NOTICE in i for i in infos(at))  # …and the page no longer says otherwise


def test_after_a_refresh_the_page_still_says_what_the_model_does_not_see(app_env, fake_engine):
    scripted = small_window(40)
    fake_engine(scripted)
    at = new_app()
    scripted.enqueue("Long reply here.", "Trimmed.")
    send(at, " ".join(f"word{i}" for i in range(20)))
    send(at, "tell me more about all of that and then some more please")
    assert any("the 2 earliest messages" in i for i in infos(at))
    again = new_app(at.query_params["cid"])  # a refresh: a new session on the same browser id
    assert len(bubbles(again)) == 4
    assert any("the 2 earliest messages" in i for i in infos(again))
