"""The app under faults: what goes wrong in one browser session stays there.

Two AppTest sessions (two browsers, two client ids) share the process, the engine and the sandbox
pool, as under `streamlit run`. One session's kernel is killed with os._exit and one session's
tool raises; the other session keeps getting replies, with its kernel and variables intact.
Model output with HTML/JS is shown as text on the Tool and Code Interpreter pages too (the Chat
page is covered in test_app.py, the browser in test_e2e_browser.py).
"""

from __future__ import annotations

import pytest
from test_app import app_env, bubbles, fake_engine, needs, on_page, send  # noqa: F401  (fixtures)

A, B = "browser-a", "browser-b"
HTML = '<script>alert(1)</script><img src=x onerror="alert(2)">'


def kernel_of(cid: str):
    from webui import interpreter_panel

    return interpreter_panel.pool().get(cid)


def test_a_kernel_killed_in_one_session_leaves_the_other_session_working(app_env, fake_engine, scripted):
    needs("chatglm_core.agent", "chatglm_core.sandbox_pool")
    fake_engine(scripted)
    scripted.enqueue("```python\nkept = 6 * 7\nprint(kept)\n```", "B has 42.")
    b = on_page("app_pages/code_interpreter.py", cid=B)
    send(b, "Compute 6*7 and keep it.")
    assert bubbles(b)[-1] == ("assistant", "B has 42.")
    b_kernel = kernel_of(B)

    scripted.enqueue("```python\nimport os\nos._exit(1)\n```", "My kernel died.")
    a = on_page("app_pages/code_interpreter.py", cid=A)
    send(a, "Crash your kernel.")
    assert not a.exception
    died = a.session_state["conv_interpreter"].messages[2]
    assert "exit code 1" in died.content and "fresh kernel" in died.content, died.content
    assert bubbles(a)[-1] == ("assistant", "My kernel died.")

    # B: same kernel, variables intact, still answering
    scripted.enqueue("```python\nprint(kept + 1)\n```", "Still here: 43.")
    send(b, "Add one to what you kept.")
    assert kernel_of(B) is b_kernel and not b_kernel.closed
    assert b.session_state["conv_interpreter"].messages[-2].content.strip() == "43"
    assert bubbles(b)[-1] == ("assistant", "Still here: 43.")
    # and A goes on with its fresh kernel
    scripted.enqueue("```python\nprint('fresh')\n```", "Back.")
    send(a, "Again?")
    assert a.session_state["conv_interpreter"].messages[-2].content.strip() == "fresh"


def test_a_failing_tool_in_one_session_leaves_the_other_session_working(app_env, fake_engine, scripted):
    needs("chatglm_core.agent", "tools")
    fake_engine(scripted)
    a = on_page("app_pages/tools.py", cid=A)
    b = on_page("app_pages/tools.py", cid=B)

    def explode(reason: str) -> str:
        """A tool that always fails.

        Args:
            reason: Why it fails.
        """
        raise RuntimeError(f"boom: {reason}")

    a.session_state["tool_registry"].register(explode)  # this session's registry only
    scripted.enqueue('<tool_call>{"name": "explode", "arguments": {"reason": "test"}}</tool_call>', "It failed.")
    send(a, "Use explode.")
    assert not a.exception
    observation = a.session_state["conv_tools"].messages[2]
    assert "RuntimeError" in observation.content and "boom: test" in observation.content
    assert bubbles(a)[-1] == ("assistant", "It failed.")

    scripted.enqueue('<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>', "It is 42.")
    send(b, "What is 6*7?")
    assert b.session_state["conv_tools"].messages[2].content == "42"
    assert bubbles(b)[-1] == ("assistant", "It is 42.")
    assert "explode" not in b.session_state["tool_registry"]
    scripted.enqueue("Fine again.")
    send(a, "Hello?")
    assert bubbles(a)[-1] == ("assistant", "Fine again.")


@pytest.mark.parametrize("page, mode", [("app_pages/tools.py", "tools"),
                                        ("app_pages/code_interpreter.py", "interpreter")])
def test_html_from_the_model_and_from_a_tool_is_text(app_env, fake_engine, scripted, page, mode):
    needs("chatglm_core.agent", "tools", "chatglm_core.sandbox_pool")
    fake_engine(scripted)
    if mode == "tools":
        call = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
    else:
        call = f"```python\nprint('{HTML}')\n```"
    scripted.enqueue(call, f"Done {HTML}")
    at = on_page(page, cid=f"html-{mode}")
    send(at, "Go.")
    shown = bubbles(at)[-1][1]
    assert "<script>" not in shown and "<img" not in shown and "&lt;script>" in shown
    if mode == "interpreter":  # the kernel's output is a code block: text, never HTML
        observation = at.main.chat_message[2]
        assert HTML in observation.code[0].value and not observation.get("html")
    assert not at.get("html") and not any("<script>" in m.value for m in at.markdown if not m.value.startswith("`"))
