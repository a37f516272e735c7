"""examples/quickstart.ipynb, run end to end on the real small model in the kernel `make kernel`
registers (installed here into a temporary Jupyter data dir, not the user's)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from chatglm_core.chat import options_from
from chatglm_core.messages import Message, Role

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
REGISTER = ["-m", "ipykernel", "install", "--user", "--name", "chatglm3", "--display-name", "Python (chatglm3)"]


class RecordingClient(NotebookClient):
    """Keeps every kernel message per cell, so the streamed display updates can be counted."""

    def process_message(self, msg, cell, cell_index):
        self.messages.setdefault(cell_index, []).append(msg["msg_type"])
        return super().process_message(msg, cell, cell_index)


@pytest.fixture
def jupyter_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    return tmp_path / "jupyter"


def register_kernel(jupyter_data_dir: Path) -> dict:
    env = {**os.environ, "JUPYTER_DATA_DIR": str(jupyter_data_dir)}
    subprocess.run([sys.executable, *REGISTER], check=True, env=env, capture_output=True, timeout=60)
    return json.loads((jupyter_data_dir / "kernels" / "chatglm3" / "kernel.json").read_text())


def test_make_kernel_runs_the_registration_command():
    dry = subprocess.run(["make", "-n", "kernel"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert dry.returncode == 0, dry.stderr
    assert ".venv/bin/python " + " ".join(REGISTER[:-1]) + ' "Python (chatglm3)"' in dry.stdout


def test_kernel_registers_this_python_under_chatglm3(jupyter_data_dir):
    spec = register_kernel(jupyter_data_dir)
    assert spec["display_name"] == "Python (chatglm3)"
    assert spec["argv"][0] == sys.executable


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert nb.metadata.kernelspec.name == "chatglm3"


def cell_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_quickstart_runs_end_to_end(jupyter_data_dir, small_engine, small_settings, tmp_path):
    register_kernel(jupyter_data_dir)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = RecordingClient(nb, kernel_name="chatglm3", timeout=600,
                             resources={"metadata": {"path": str(ROOT / "examples")}})
    client.messages = {}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "CHATGLM_DATA_DIR": str(small_settings.data_dir), "CHATGLM_DEVICE": "cpu"}
    client.execute(env=env)  # raises CellExecutionError (with the traceback) if any cell fails

    cells = {c.metadata.tags[0]: (i, c) for i, c in enumerate(nb.cells) if c.metadata.get("tags")}
    assert "SmolLM2-135M-Instruct on cpu" in cell_text(cells["setup"][1])

    def greedy(messages: list[Message], max_new_tokens: int) -> str:
        opts = options_from(small_settings, temperature=0.0, max_new_tokens=max_new_tokens)
        return small_engine.complete(messages, opts).message.content

    q1, q2 = "What is the capital of France?", "Name three famous French painters."
    first = greedy([Message(Role.USER, q1)], 32)
    assert cell_text(cells["chat"][1]).strip() == first

    index, stream = cells["stream"]
    second = greedy([Message(Role.USER, q1), Message(Role.ASSISTANT, first), Message(Role.USER, q2)], 64)
    [shown] = [o for o in stream.outputs if o.output_type == "display_data"]
    assert shown.data["text/markdown"] == second  # the display ends on the whole reply
    assert client.messages[index].count("update_display_data") > 1  # and was redrawn as it grew

    from tools import dispatch_tool

    tool = cell_text(cells["tool"][1]).splitlines()
    assert tool[0].startswith("tools:") and "calculator" in tool[0]
    assert tool[1].startswith("call:   calculator {")
    arguments = json.loads(tool[1].partition("calculator ")[2])  # what the model asked for
    assert tool[2] == f"result: {dispatch_tool('calculator', arguments).content}"  # what the tool said to that
    assert tool[3].startswith("answer:")

    sandbox = cells["sandbox"][1]
    text = cell_text(sandbox)
    assert "ok 2432902008176640000" in text
    assert "ok 1 image(s)" in text
    assert "error ZeroDivisionError: division by zero" in text
    assert any("image/png" in o.get("data", {}) for o in sandbox.outputs)


def test_package_exports_the_functions_not_the_chat_module():
    """The notebook's `from chatglm_core import chat, get_engine, stream_chat` in a fresh interpreter."""
    code = ("from chatglm_core import chat, get_engine, stream_chat\n"
            "print(callable(chat), chat.__name__, stream_chat.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.stdout.split() == ["True", "chat", "stream_chat"], proc.stderr
