"""The terminal chat driven through stdin, as a user would: a question, clear, exit."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_question_clear_exit(small_settings):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(small_settings.data_dir), "CHATGLM_DATA_DIR": str(small_settings.data_dir),
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CHATGLM_BACKEND": "transformers"}  # the reply below is fp32's
    proc = subprocess.run(
        [sys.executable, "-m", "chatglm_core.cli", "--temperature", "0", "--max-new-tokens", "20"],
        input="What is the capital of France?\nclear\nexit\n", capture_output=True, text=True, timeout=180,
        env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "Chat with SmolLM2-135M-Instruct (cpu)" in proc.stdout
    # the flag's temperature wins; the rest is the model card's top_p and our fallbacks
    assert ("Sampling: temperature 0, top_p 0.9, top_k off, repetition penalty 1.05 (top_p: SmolLM2's model card)"
            in proc.stdout)
    assert "SmolLM2-135M-Instruct: The capital of France is Paris." in proc.stdout
    assert "(history cleared)" in proc.stdout


def test_cli_session_keeps_and_clears_history(small_engine, small_settings):
    import io

    from chatglm_core.cli import ChatSession, repl

    s = small_settings.model_copy(update={"temperature": 0.0, "max_new_tokens": 12})
    session = ChatSession(small_engine, s)
    out = io.StringIO()
    repl(session, io.StringIO("Name a color.\n"), out)
    assert len(session.history) == 2 and session.history[1].content in out.getvalue()
    repl(session, io.StringIO("clear\n"), out)
    assert session.history == []


def test_cli_bad_model_path_exits_with_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "chatglm_core.cli", "--model-path", str(tmp_path / "missing")],
                          input="", capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


def test_cli_conversation_longer_than_the_window_goes_on(small_backend, small_settings, monkeypatch):
    """Three windows' worth of turns with the real model: every turn is answered, and the terminal
    says when the oldest messages leave the model's view."""
    import io

    from chatglm_core.cli import ChatSession, repl
    from chatglm_core.engine import Engine

    monkeypatch.setattr(small_backend, "context_window", 512)
    s = small_settings.model_copy(update={"temperature": 0.0, "max_new_tokens": 4})
    session = ChatSession(Engine(small_backend), s)
    out = io.StringIO()
    lines = "".join(f"Note {i}: " + "the quick brown fox jumps over the lazy dog. " * 30 + "\n" for i in range(6))
    repl(session, io.StringIO(lines + "Hi\n"), out)
    text = out.getvalue()
    assert "[error]" not in text and len(session.history) == 14
    assert len(small_backend.prompt_ids(session.history)) > 3 * 512
    assert "[The model no longer sees the 2 earliest messages of this conversation" in text
    assert all(m.content.strip() for m in session.history if m.role.value == "assistant")
