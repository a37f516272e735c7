"""Documents: ingest time for a 100-page PDF, search latency, and recall@k lexical vs dense vs hybrid.

    .venv/bin/python benchmarks/bench_documents.py

The PDF is generated (fpdf2) from the public-domain passages in documents_corpus.py, about 350
words a page. Recall uses those passages as one Markdown file per language (one heading each) in
one index, and the questions in documents_corpus.QUESTIONS (each answered by one passage, found by
its key phrase). PDF libraries other than the one used (pypdf, pdfminer.six) are timed when installed.
"""

from __future__ import annotations

import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from documents_corpus import CHINESE, ENGLISH, QUESTIONS  # noqa: E402

from chatglm_core.api.embeddings import Embedder  # noqa: E402
from chatglm_core.documents import DocumentIndex  # noqa: E402
from chatglm_core.documents.chunk import chunk_sections  # noqa: E402
from chatglm_core.documents.parse import parse_file  # noqa: E402


def make_pdf(path: Path, pages: int = 100) -> Path:
    from fpdf import FPDF

    texts = list(ENGLISH.values())
    doc = FPDF()
    doc.set_font("Helvetica", size=10)
    for n in range(pages):
        doc.add_page()
        body = " ".join(texts[(n + i) % len(texts)] for i in range(5))
        doc.multi_cell(0, 4.5, f"Page {n + 1}. {body}")
    doc.output(str(path))
    return path


def cpu() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    import os

    return f"{model}, {os.cpu_count()} CPUs"


def ms(seconds: list[float]) -> str:
    s = sorted(seconds)
    return f"p50 {1000 * statistics.median(s):.2f} ms, p95 {1000 * s[int(0.95 * (len(s) - 1))]:.2f} ms"


def ingest(tmp: Path, embedder: Embedder) -> DocumentIndex:
    pdf = make_pdf(tmp / "hundred.pdf")
    t0 = time.perf_counter()
    sections = parse_file(pdf)
    t1 = time.perf_counter()
    chunks = chunk_sections(sections)
    t2 = time.perf_counter()
    embedder.embed([c.text for c in chunks])
    t3 = time.perf_counter()
    index = DocumentIndex(embedder)
    start = time.perf_counter()
    doc = index.add(pdf)
    total = time.perf_counter() - start
    words = sum(len(s.text.split()) for s in sections)
    print(f"ingest: 100-page PDF ({pdf.stat().st_size // 1024} KiB, {words:,} words) -> {doc.chunks} chunks "
          f"in {total:.2f} s (DocumentIndex.add)")
    print(f"  parse (child process, pypdfium2) {t1 - t0:.2f} s, chunk {1000 * (t2 - t1):.0f} ms, "
          f"embed {t3 - t2:.2f} s ({len(chunks) / (t3 - t2):.0f} chunks/s)")
    other_pdf_libraries(pdf)
    return index


def other_pdf_libraries(pdf: Path) -> None:
    import pypdfium2

    def pdfium() -> int:
        d = pypdfium2.PdfDocument(str(pdf))
        return sum(len(d[i].get_textpage().get_text_range()) for i in range(len(d)))

    readers = {"pypdfium2": pdfium}
    try:
        import pypdf

        readers["pypdf"] = lambda: sum(len(p.extract_text()) for p in pypdf.PdfReader(str(pdf)).pages)
    except ImportError:
        pass
    try:
        from pdfminer.high_level import extract_text

        readers["pdfminer.six"] = lambda: len(extract_text(str(pdf)))
    except ImportError:
        pass
    for name, read in readers.items():  # interleaved twice: the machine is shared
        times = []
        for _ in range(2):
            t = time.perf_counter()
            chars = read()
            times.append(time.perf_counter() - t)
        print(f"  text extraction alone, {name}: {min(times):.2f} s ({chars:,} characters)")


def latency(index: DocumentIndex) -> None:
    t = time.perf_counter()
    index.search("first query builds the BM25 index", k=5, mode="lexical")
    first = 1000 * (time.perf_counter() - t)
    print(f"search on {len(index._chunks)} chunks: first lexical query (builds BM25) {first:.0f} ms")
    for mode in ("lexical", "dense", "hybrid"):
        times = []
        for q, _ in QUESTIONS:
            t = time.perf_counter()
            index.search(q, k=5, mode=mode)
            times.append(time.perf_counter() - t)
        print(f"  {mode:7s} {ms(times)} over {len(times)} queries")


def recall(tmp: Path, embedder: Embedder) -> None:
    index = DocumentIndex(embedder)
    for name, passages in (("english.md", ENGLISH), ("chinese.md", CHINESE)):
        (tmp / name).write_text("".join(f"# {title}\n\n{text}\n\n" for title, text in passages.items()),
                                encoding="utf-8")
        index.add(tmp / name)
    print(f"recall on {len(index._chunks)} passages ({len(ENGLISH)} English, {len(CHINESE)} Chinese), "
          f"{len(QUESTIONS)} questions:")
    for lang, questions in (("English", [q for q in QUESTIONS if q[0].isascii()]),
                            ("Chinese", [q for q in QUESTIONS if not q[0].isascii()])):
        for mode in ("lexical", "dense", "hybrid"):
            ranks = []
            for q, key in questions:
                found = [i for i, p in enumerate(index.search(q, k=5, mode=mode)) if key in p.text]
                ranks.append(found[0] + 1 if found else None)
            at1 = sum(r == 1 for r in ranks) / len(ranks)
            at5 = sum(r is not None for r in ranks) / len(ranks)
            print(f"  {lang:7s} {mode:7s} recall@1 {at1:.2f}  recall@5 {at5:.2f}  ({len(ranks)} questions)")


def main() -> None:
    print(f"CPU: {cpu()}; embedding model: all-MiniLM-L6-v2 (embedded)")
    embedder = Embedder()
    embedder.embed(["warm up"])  # load the model outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        index = ingest(Path(tmp), embedder)
        latency(index)
        recall(Path(tmp), embedder)


if __name__ == "__main__":
    main()
