"""chatglm_core.documents: real files of each format, real parsing, the real embedding model, the store.

Files are written in the test by the libraries that make them (tests/document_files.py); searches
use the embedded all-MiniLM-L6-v2 through the same Embedder the API uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chatglm_core.documents import DocumentIndex, ParseLimits, build_context
from chatglm_core.documents.chunk import chunk_text, estimate_tokens, lexical_tokens
from chatglm_core.documents.parse import Section, parse_file
from chatglm_core.errors import RequestError
from chatglm_core.store import Conversation, ConversationStore, DocumentStore
import document_files as make

FACTS = [
    "The lighthouse keeper logged the storm in the harbour ledger every evening.",
    "The miller ground barley and rye for the whole valley in the dry season.",
    "The treaty was signed at Quillbridge on the ninth of March by both envoys.",
    "Pelicans nested on the southern cliffs, far from the fishing boats.",
]
LUNYU = ("子曰：学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？\n\n"
         "子曰：温故而知新，可以为师矣。\n\n"
         "子曰：三人行，必有我师焉。择其善者而从之，其不善者而改之。\n\n"
         "子曰：知之为知之，不知为不知，是知也。")


@pytest.fixture(scope="module")
def embedder():
    from chatglm_core.api.embeddings import Embedder

    return Embedder()


@pytest.fixture
def index(embedder) -> DocumentIndex:
    return DocumentIndex(embedder)


# --- formats ------------------------------------------------------------------------------------
def test_pdf_pages_are_cited_by_number(index, tmp_path):
    doc = index.add(make.pdf(tmp_path / "report.pdf", [f"Page {i + 1}. {f}" for i, f in enumerate(FACTS)]))
    assert (doc.name, doc.pages) == ("report.pdf", 4)
    top = index.search("Where and when was the treaty signed?", k=5)
    assert top[0].page == 3 and "Quillbridge" in top[0].text and top[0].source == "report.pdf"
    assert [p.score for p in top] == sorted((p.score for p in top), reverse=True)
    assert top[0].where == "report.pdf, page 3"


def test_docx_sections_and_tables(index, tmp_path):
    path = make.docx(tmp_path / "notes.docx", {"Harbour": FACTS[0], "Mill": FACTS[1], "Birds": FACTS[3]})
    index.add(path)
    top = index.search("who grinds barley?", k=1)[0]
    assert (top.section, top.page) == ("Mill", None) and "barley" in top.text
    assert "quince | golden" in index.search("quince colour", k=1)[0].text


def test_pptx_slides_are_pages(index, tmp_path):
    index.add(make.pptx(tmp_path / "deck.pptx", FACTS))
    top = index.search("pelican nests", k=1)[0]
    assert (top.page, top.section, top.where) == (4, "slide 4", "deck.pptx, slide 4")


def test_xlsx_and_csv_rows(index, tmp_path):
    index.add(make.xlsx(tmp_path / "stock.xlsx", {"Fruit": [["name", "count"], ["apples", 12]],
                                                   "Tools": [["name", "count"], ["hammers", 7]]}))
    (tmp_path / "prices.csv").write_text("item;price\nlantern;42\nrope;3\n", encoding="utf-8")
    index.add(tmp_path / "prices.csv")
    assert index.search("how many hammers", k=1)[0].section == "sheet Tools"
    lantern = index.search("lantern price", k=1)[0]
    assert "lantern | 42" in lantern.text and lantern.source == "prices.csv"


def test_html_and_markdown_sections_drop_scripts(index, tmp_path):
    (tmp_path / "page.html").write_text(
        "<html><head><style>p{}</style><script>var secret='pelican';</script></head><body>"
        f"<h1>Harbour</h1><p>{FACTS[0]}</p><h2>Treaty</h2><p>{FACTS[2]}</p></body></html>", encoding="utf-8")
    (tmp_path / "readme.md").write_text(f"# Mill\n\n{FACTS[1]}\n\n## Birds\n\n{FACTS[3]}\n", encoding="utf-8")
    html = parse_file(tmp_path / "page.html")
    assert [s.section for s in html if s.text.strip()][-2:] == ["Harbour", "Treaty"]
    assert "secret" not in " ".join(s.text for s in html)
    index.add(tmp_path / "page.html")
    index.add(tmp_path / "readme.md")
    assert index.search("treaty envoys", k=1)[0].section == "Treaty"
    assert index.search("pelicans cliffs", k=1)[0].where == "readme.md, Birds"


def test_chinese_text_lexical_search(index, tmp_path):
    (tmp_path / "lunyu.txt").write_text(LUNYU, encoding="gb18030")  # a GBK-family file, as Chinese tools write
    index.add(tmp_path / "lunyu.txt")
    assert {"学", "学而", "时习"} <= set(lexical_tokens("学而时习之"))
    for query, expected in [("温故知新", "温故而知新"), ("三人行", "三人行"), ("有朋自远方来", "有朋自远方来")]:
        assert expected in index.search(query, k=1, mode="lexical")[0].text
        assert expected in index.search(query, k=1)[0].text


# --- hostile and broken files: a clear error each, the index keeps working ----------------------
def test_hostile_files_are_refused_and_the_index_goes_on(index, tmp_path):
    index.add(make.pdf(tmp_path / "good.pdf", FACTS))
    cases = {
        "no text layer": (make.scanned_pdf(tmp_path / "scan.pdf"), "no text layer"),
        "password": (make.encrypted_pdf(tmp_path / "locked.pdf"), "password"),
        "garbage pdf": (_write(tmp_path / "junk.pdf", os.urandom(5000)), "not a readable PDF"),
        "garbage docx": (_write(tmp_path / "junk.docx", os.urandom(5000)), "not a valid .docx"),
        "binary as text": (_write(tmp_path / "blob.txt", b"\x00\x01\x02" * 100), "binary data"),
        "empty": (_write(tmp_path / "empty.md", b""), "empty"),
        "unknown type": (_write(tmp_path / "tool.exe", b"MZ"), "can't be read"),
        "thousands of pages": (make.pdf(tmp_path / "long.pdf", ["x"] * 2100), "2,100 pages"),
    }
    for what, (path, message) in cases.items():
        with pytest.raises(RequestError, match=message) as e:
            index.add(path)
        assert path.name in str(e.value), what
    assert len(index.documents) == 1
    assert index.search("treaty", k=1)[0].source == "good.pdf"


def test_zip_bomb_is_refused_before_inflating(index, tmp_path):
    bomb = make.zip_bomb(tmp_path / "bomb.docx", 400_000_000)  # 400 MB of zeros in ~0.4 MB
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(RequestError, match="zip bomb"):
        index.add(bomb)


def test_a_parser_that_runs_too_long_is_stopped(embedder, tmp_path):
    slow = DocumentIndex(embedder, limits=ParseLimits(timeout=0.3))
    path = make.pdf(tmp_path / "big.pdf", [" ".join(FACTS * 20)] * 400)
    with pytest.raises(RequestError, match="longer than 0.3 s"):
        slow.add(path)


def test_memory_limit_stops_a_decompression_bomb_inside_the_parser(embedder, tmp_path):
    # a valid Word file whose text part inflates to 200 MB: past the zip check (its limit raised here),
    # the parser itself runs out of its 300 MB address space and the child process says so
    bomb = make.docx_bomb(tmp_path / "bomb.docx", 200_000_000)
    bombs = DocumentIndex(embedder, limits=ParseLimits(max_unzipped=10**10, memory_mb=300))
    with pytest.raises(RequestError, match="bomb.docx: reading it needed more memory than the limit allows"):
        bombs.add(bomb)


def test_file_size_and_text_limits(embedder, tmp_path):
    path = make.pdf(tmp_path / "report.pdf", FACTS)
    with pytest.raises(RequestError, match="over the limit"):
        DocumentIndex(embedder, limits=ParseLimits(max_bytes=100)).add(path)
    with pytest.raises(RequestError, match="characters of text"):
        DocumentIndex(embedder, limits=ParseLimits(max_chars=50)).add(path)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- chunks --------------------------------------------------------------------------------------
def test_chunks_overlap_and_stay_within_their_page():
    text = " ".join(f"Sentence number {i} is about item {i}." for i in range(200))
    chunks = chunk_text(text, size=60, overlap=15)
    assert all(estimate_tokens(c) <= 60 for c in chunks)
    assert len(chunks) > 10
    for a, b in zip(chunks, chunks[1:]):
        assert a.split(". ")[-1].rstrip(".") in b  # the last sentence of one opens the next
    from chatglm_core.documents.chunk import chunk_sections

    pieces = chunk_sections([Section("one. " * 100, page=1), Section("two. " * 100, page=2)], size=60, overlap=10)
    assert {c.page for c in pieces if "one" in c.text} == {1} and {c.page for c in pieces if "two" in c.text} == {2}


def test_an_overlong_sentence_is_cut():
    chunks = chunk_text("word " * 500, size=100, overlap=0)
    assert [estimate_tokens(c) for c in chunks] == [100] * 5


# --- strategies ----------------------------------------------------------------------------------
def test_whole_document_when_it_fits_else_retrieval(index, tmp_path):
    index.add(make.pdf(tmp_path / "report.pdf", FACTS))
    whole = build_context(index, "Summarise this.", budget_tokens=4000, count_tokens=estimate_tokens)
    assert whole.strategy == "whole" and [p.page for p in whole.passages] == [1, 2, 3, 4]
    prompt = whole.prompt("Summarise this.")
    assert "[3] report.pdf, page 3:\n" + FACTS[2] in prompt and prompt.endswith("Question: Summarise this.")
    few = build_context(index, "Who signed the treaty?", budget_tokens=60, count_tokens=estimate_tokens, k=2)
    assert few.strategy == "retrieval" and len(few.passages) == 2 and few.passages[0].page == 3
    assert "retrieval" in few.describe() and "whole document" in whole.describe()
    assert build_context(DocumentIndex(index.embedder), "x", budget_tokens=10, count_tokens=len) is None


# --- persistence ---------------------------------------------------------------------------------
def test_documents_persist_per_conversation_and_die_with_it(embedder, tmp_path):
    convs = ConversationStore(tmp_path / "c.sqlite3")
    docs = DocumentStore(convs)
    conv = convs.save(Conversation("alice" * 6 + "aa", "chat"))
    first = DocumentIndex(embedder, store=docs, client_id=conv.client_id, conversation_id=conv.id)
    first.add(make.pdf(tmp_path / "report.pdf", FACTS))
    docs.save_turn(conv.client_id, conv.id, 0, {"strategy": "whole", "passages": []})

    again = DocumentIndex(embedder, store=DocumentStore(ConversationStore(convs.path)),
                          client_id=conv.client_id, conversation_id=conv.id)  # as after a restart
    assert [d.name for d in again.documents] == ["report.pdf"]
    assert again.search("treaty", k=3) == first.search("treaty", k=3)
    assert again.documents[0].sections == first.documents[0].sections

    stranger = DocumentIndex(embedder, store=docs, client_id="bob" * 10 + "bb", conversation_id=conv.id)
    assert stranger.documents == [] and docs.turns("bob" * 10 + "bb", conv.id) == {}
    assert not docs.remove("bob" * 10 + "bb", again.documents[0].id)

    convs.delete(conv.client_id, conv.id)
    assert DocumentIndex(embedder, store=docs, client_id=conv.client_id, conversation_id=conv.id).documents == []
    assert docs.turns(conv.client_id, conv.id) == {}
    import sqlite3

    with sqlite3.connect(convs.path) as db:
        assert db.execute("SELECT COUNT(*) FROM document_chunks").fetchone() == (0,)


def test_remove_one_document(index, tmp_path):
    a = index.add(make.pdf(tmp_path / "a.pdf", FACTS[:2]))
    index.add(make.pdf(tmp_path / "b.pdf", FACTS[2:]))
    index.remove(a.id)
    assert [d.name for d in index.documents] == ["b.pdf"]
    assert {p.source for p in index.search("lighthouse barley treaty", k=5)} == {"b.pdf"}


def test_documents_are_re_embedded_when_the_embedding_model_changes(embedder, tmp_path):
    from chatglm_core.api.embeddings import Embedder, default_model_dir

    docs = DocumentStore(ConversationStore(tmp_path / "c.sqlite3"))
    DocumentIndex(embedder, store=docs, client_id="c", conversation_id="v").add(make.pdf(tmp_path / "r.pdf", FACTS))
    other = Embedder(str(default_model_dir()))  # as if EMBEDDING_PATH now named another folder
    reopened = DocumentIndex(other, store=docs, client_id="c", conversation_id="v")
    assert [row[3] for row in docs.documents("c", "v")] == [str(default_model_dir())]
    assert reopened.search("treaty", k=1)[0].page == 3
