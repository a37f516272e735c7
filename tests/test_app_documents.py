"""Documents in the Streamlit app (AppTest, main.py as the entry): attach, ask, see the citations.

The real model answers (greedy, a few tokens: what it says is not asserted, the passages it was
given are); the real embedding model indexes; the store is a temp dir.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import document_files as make
import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300
FACT = "The treaty was signed at Quillbridge on the ninth of March by both envoys."


@pytest.fixture(scope="module")
def app_env(tmp_path_factory, test_data_dir):
    from webui import attachments, state

    data = tmp_path_factory.mktemp("app-docs-data")
    caches = (state.settings, state.store, state._engine_or_error, attachments._document_store)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MODEL_PATH", "CHATGLM_MODEL_PATH", "CHATGLM_REMOTE_BASE_URL", "CHATGLM_TOOLS",
                     "CHATGLM_SYSTEM_PROMPT", "CHATGLM_BACKEND", "CHATGLM_GGUF_WEIGHTS", "EMBEDDING_PATH"):
            mp.delenv(name, raising=False)
        mp.setenv("CHATGLM_DATA_DIR", str(data))
        mp.setenv("CHATGLM_CACHE_DIR", str(test_data_dir / "cache"))
        mp.setenv("CHATGLM_DEVICE", "cpu")
        mp.setenv("CHATGLM_TEMPERATURE", "0")
        mp.setenv("CHATGLM_MAX_NEW_TOKENS", "8")
        for cache in caches:
            cache.clear()
        yield data
    for cache in caches:
        cache.clear()


def new_app(cid: str | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "main.py"), default_timeout=TIMEOUT)
    if cid:
        at.query_params["cid"] = cid
    return at.run()


def attach(at: AppTest, *files: tuple[str, bytes]) -> AppTest:
    at.main.file_uploader[0].set_value([(name, data, "application/octet-stream") for name, data in files]).run()
    assert not at.exception, at.exception
    return at


def ask(at: AppTest, text: str) -> AppTest:
    at.chat_input(key="input_chat").set_value(text).run()
    assert not at.exception, at.exception
    return at


def captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.main.caption).replace("\\", "")  # markdown escapes dropped


def cited(at: AppTest) -> list[str]:
    """The labels of the passages shown under the last reply, in order."""
    replies = [m for m in at.main.chat_message if m.name == "assistant"]
    return [e.label for e in replies[-1].expander] if replies else []


def test_a_long_pdf_is_searched_and_the_reply_cites_page_3(app_env, tmp_path):
    pdf = make.pdf(tmp_path / "chronicle.pdf", make.long_pages(40, {3: FACT}))
    at = attach(new_app(), ("chronicle.pdf", pdf.read_bytes()))
    assert "attached chronicle.pdf" in captions(at)
    assert "chronicle.pdf" in captions(at) and "40 pages" in captions(at)
    ask(at, "Where was the treaty signed?")
    assert "Documents: retrieval" in captions(at)
    labels = cited(at)
    assert len(labels) == 5 and labels[0] == "[1] chronicle.pdf, page 3"
    first = [m for m in at.main.chat_message if m.name == "assistant"][-1].expander[0]
    assert FACT in " ".join(first.text[0].value.split())  # the PDF wraps lines

    cid = at.query_params["cid"]
    again = new_app(cid)  # a refresh (or a restart): the document and the citations come back
    assert "chronicle.pdf" in captions(again) and cited(again) == labels
    stranger = new_app()  # another browser never sees them
    assert "chronicle.pdf" not in captions(stranger) and not stranger.main.expander

    again.button(key="clear_conv").click().run()
    assert "chronicle.pdf" not in captions(again)
    again.button(key="undo_chat").click().run()  # Undo brings the conversation back with its documents
    assert "chronicle.pdf" in captions(again) and cited(again) == labels
    again.button(key="clear_conv").click().run()  # deleting the conversation deletes its documents,
    again.button(key="new_conv").click().run()  # for good once the Undo offer that came with Clear is gone
    with sqlite3.connect(app_env / "conversations.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM documents WHERE client_id = ?", (cid,)).fetchone() == (0,)


def test_a_short_document_goes_in_whole(app_env, tmp_path):
    at = attach(new_app(), ("notes.md", b"# Harbour\n\nThe lighthouse keeper logged the storm.\n\n"
                                       b"# Mill\n\nThe miller ground barley.\n"))
    ask(at, "Summarise this.")
    assert "Documents: whole document in the prompt (notes.md)" in captions(at)
    assert cited(at) == ["[1] notes.md, Harbour", "[2] notes.md, Mill"]


def test_bad_files_get_a_clear_error_and_the_session_goes_on(app_env, tmp_path):
    from chatglm_core.store import ConversationStore

    at = attach(new_app(), ("junk.docx", b"not a zip at all"))
    assert any(e.value.startswith("Not attached. junk.docx: it is not a valid .docx") for e in at.main.error)
    assert ConversationStore(app_env / "conversations.sqlite3").list(at.query_params["cid"]) == []  # nothing made
    attach(at, ("scan.pdf", make.scanned_pdf(tmp_path / "scan.pdf").read_bytes()),
           ("ok.txt", b"Pelicans nested on the southern cliffs."))
    assert any("scan.pdf: the PDF has no text layer" in e.value for e in at.main.error)
    assert "attached ok.txt" in captions(at)
    stored = ConversationStore(app_env / "conversations.sqlite3").list(at.query_params["cid"])
    assert [c.title for c in stored] == ["ok.txt"]  # the conversation now exists: it owns the document
    ask(at, "Where did pelicans nest?")
    assert cited(at) == ["[1] ok.txt"]
    remove = next(b for b in at.main.button if b.key.startswith("rmdoc_"))
    remove.click().run()
    assert "**ok.txt** (" not in captions(at) and not [b for b in at.main.button if b.key.startswith("rmdoc_")]
    assert cited(at) == ["[1] ok.txt"]  # what the past reply was given stays shown


def test_a_missing_embedding_model_is_a_clear_error_not_a_crash(app_env, monkeypatch, tmp_path):
    from webui import attachments, state

    monkeypatch.setenv("EMBEDDING_PATH", str(tmp_path / "no-such-model"))
    state.settings.clear()
    attachments.embedder.clear()
    try:
        at = attach(new_app(), ("notes.md", b"# Mill\n\nThe miller ground barley.\n"))
        assert any(e.value.startswith("Not attached. notes.md: EMBEDDING_PATH") and "is not a folder" in e.value
                   for e in at.main.error), [e.value for e in at.main.error]
        ask(at, "Say hi.")  # the chat goes on without documents
        assert [m.name for m in at.main.chat_message] == ["user", "assistant"]
    finally:
        state.settings.clear()
        attachments.embedder.clear()
