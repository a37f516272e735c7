"""Text out of a file, one library per format; run as a child process by `parse.parse_file`.

Libraries, chosen by measuring (a 100-page text PDF, 2 CPU cores): pypdfium2 (PDFium, C) read it in
0.13 s, pypdf in 0.39 s, pdfminer.six in 4 s and doubled every space, so PDFs go through
pypdfium2. Word, slides and sheets: python-docx, python-pptx, openpyxl (read-only, through
defusedxml); HTML: BeautifulSoup; CSV: the csv module. markitdown wraps much the same libraries
behind one call but flattens pages away, and pages are what citations name.

This file imports nothing from chatglm_core: it runs as ``python -I extract.py FILE KIND`` under a
time and memory limit, so a parser that hangs, eats memory or crashes on a hostile file takes
only this process down. It prints one JSON object: ``{"sections": [{"text", "page", "section"}]}``
or ``{"error": "..."}`` (a message for the user).
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

Section = dict[str, Any]  # {"text": str, "page": int | None, "section": str | None}


class Refused(Exception):
    """A file we won't or can't read; the message is for the user."""


def extract(path: Path, kind: str, max_pages: int, max_chars: int, max_unzipped: int) -> list[Section]:
    if kind in ("docx", "pptx", "xlsx"):
        check_zip(path, kind, max_unzipped)
    sections = READERS[kind](path, max_pages)
    total = sum(len(s["text"]) for s in sections)
    if total > max_chars:
        raise Refused(f"it holds {total:,} characters of text, more than the limit of {max_chars:,} "
                      "(CHATGLM_DOCUMENTS_MAX_CHARS): split it into smaller files")
    sections = [s for s in sections if s["text"].strip()]
    if not sections:
        if kind == "pdf":
            raise Refused("the PDF has no text layer (a scan or images only); this app does no OCR: "
                          "run it through OCR first (e.g. `ocrmypdf in.pdf out.pdf`) and attach the result")
        raise Refused("no text found in it")
    return sections


def check_zip(path: Path, kind: str, max_unzipped: int) -> None:
    """Office files are zip archives: refuse a zip bomb before any parser inflates it."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError):
        raise Refused(f"it is not a valid .{kind} file (not a zip archive): is it damaged, or misnamed?") from None
    size = sum(i.file_size for i in infos)
    if len(infos) > 10_000 or size > max_unzipped:
        raise Refused(f"it would unpack to {size:,} bytes in {len(infos):,} parts, over the limit of "
                      f"{max_unzipped:,} bytes (a zip bomb, or far too big to read)")


def read_pdf(path: Path, max_pages: int) -> list[Section]:
    import pypdfium2 as pdfium

    try:
        doc = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        if "password" in str(e).lower():
            raise Refused("the PDF is password-protected: remove the password and attach it again") from None
        raise Refused(f"it is not a readable PDF ({e})") from None
    with doc:
        if len(doc) > max_pages:
            raise Refused(f"it has {len(doc):,} pages, more than the limit of {max_pages:,} "
                          "(CHATGLM_DOCUMENTS_MAX_PAGES): split it")
        out = []
        for i in range(len(doc)):
            page = doc[i]
            text = page.get_textpage().get_text_range()
            out.append({"text": unwrap(text.replace("\r\n", "\n").replace("\r", "\n")), "page": i + 1,
                        "section": None})
            page.close()
    return out


_WRAPPED = re.compile(r"(?<=[^\s.!?:;。！？：；])\n(?=[^\s\-•*\d])")
_CJK_CHAR = re.compile(r"[\u3000-\u9fff\uff00-\uffef]")


def unwrap(text: str) -> str:
    """Join a PDF's line-wrapped sentences (a break after a word that ends no sentence, before more text)."""
    def join(m: re.Match) -> str:
        before, after = text[m.start() - 1], text[m.end()]
        return "" if _CJK_CHAR.match(before) and _CJK_CHAR.match(after) else " "

    return _WRAPPED.sub(join, text)


def read_docx(path: Path, max_pages: int) -> list[Section]:
    import docx
    from docx.table import Table

    d = docx.Document(str(path))
    out: list[Section] = []
    heading, lines = None, []
    for block in d.iter_inner_content():
        if isinstance(block, Table):
            lines += [" | ".join(c.text.strip() for c in row.cells) for row in block.rows]
            continue
        style = (block.style.name if block.style is not None else "") or ""
        if style.startswith(("Heading", "Title")) and block.text.strip():
            out.append({"text": "\n".join(lines), "page": None, "section": heading})
            heading, lines = block.text.strip(), []
        lines.append(block.text)
    out.append({"text": "\n".join(lines), "page": None, "section": heading})
    return out


def read_pptx(path: Path, max_pages: int) -> list[Section]:
    import pptx

    deck = pptx.Presentation(str(path))
    if len(deck.slides) > max_pages:
        raise Refused(f"it has {len(deck.slides):,} slides, more than the limit of {max_pages:,}: split it")
    out = []
    for n, slide in enumerate(deck.slides, 1):
        texts = [sh.text_frame.text for sh in slide.shapes if sh.has_text_frame]
        if slide.has_notes_slide:
            texts.append(slide.notes_slide.notes_text_frame.text)
        out.append({"text": "\n".join(texts), "page": n, "section": f"slide {n}"})
    return out


def read_xlsx(path: Path, max_pages: int) -> list[Section]:
    import openpyxl

    book = openpyxl.load_workbook(str(path), read_only=True, data_only=True)
    try:
        return [{"text": "\n".join(" | ".join("" if v is None else str(v) for v in row)
                                   for row in sheet.iter_rows(values_only=True) if any(v is not None for v in row)),
                 "page": None, "section": f"sheet {sheet.title}"} for sheet in book.worksheets]
    finally:
        book.close()


def read_csv(path: Path, max_pages: int) -> list[Section]:
    text = read_text_file(path)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    rows = csv.reader(io.StringIO(text), dialect)
    text = "\n".join(" | ".join(r) for r in rows if any(c.strip() for c in r))
    return [{"text": text, "page": None, "section": None}]


def read_html(path: Path, max_pages: int) -> list[Section]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(read_text_file(path), "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    # headings start sections: mark them, then split the text at the marks
    for h in soup.find_all(["h1", "h2", "h3"]):
        h.insert_before("\n\x00" + h.get_text(" ", strip=True) + "\x00\n")
        h.decompose()
    return split_marked(soup.get_text("\n"))


def read_markdown(path: Path, max_pages: int) -> list[Section]:
    text = re.sub(r"^ {0,3}#{1,3}[ \t]+(.+?)[ \t#]*$", lambda m: "\x00" + m.group(1) + "\x00", read_text_file(path),
                  flags=re.M)
    return split_marked(text)


def read_plain(path: Path, max_pages: int) -> list[Section]:
    return [{"text": read_text_file(path), "page": None, "section": None}]


def split_marked(text: str) -> list[Section]:
    """Text with headings wrapped in NULs → one section per heading (the heading line kept in it)."""
    parts = text.split("\x00")
    out = [{"text": parts[0], "page": None, "section": None}]
    for i in range(1, len(parts) - 1, 2):
        out.append({"text": parts[i] + "\n" + parts[i + 1], "page": None, "section": parts[i].strip()})
    return [{**s, "text": re.sub(r"\n{3,}", "\n\n", s["text"])} for s in out]


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise Refused("it is binary data, not text: is the file name's extension right?")
    for encoding in ("utf-8-sig", "gb18030"):  # gb18030 covers GBK/GB2312, common for Chinese files
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


READERS = {"pdf": read_pdf, "docx": read_docx, "pptx": read_pptx, "xlsx": read_xlsx, "csv": read_csv,
           "html": read_html, "markdown": read_markdown, "text": read_plain}


def limit_memory(mb: int) -> None:
    """Cap this process's address space, so a decompression bomb fails with MemoryError."""
    try:
        import resource
    except ImportError:  # Windows: only the timeout applies
        return
    resource.setrlimit(resource.RLIMIT_AS, (mb * 1024 * 1024, mb * 1024 * 1024))


def main(argv: list[str]) -> int:
    path, kind, max_pages, max_chars, max_unzipped, memory_mb = argv[0], argv[1], *map(int, argv[2:6])
    limit_memory(memory_mb)
    try:
        result: dict[str, Any] = {"sections": extract(Path(path), kind, max_pages, max_chars, max_unzipped)}
    except Refused as e:
        result = {"error": str(e)}
    except MemoryError:
        result = {"error": "reading it needed more memory than the limit allows (a hostile or broken file?)"}
    except Exception as e:  # a parser's own error on a broken file: said plainly, never a traceback
        result = {"error": f"it could not be read as .{kind} ({type(e).__name__}: {str(e)[:200]}): "
                           "is it damaged, or misnamed?"}
    sys.stdout.write(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
