"""Real files of every accepted format, written by the libraries that make them (for the documents tests)."""

from __future__ import annotations

import zipfile
from pathlib import Path


def pdf(path: Path, pages: list[str]) -> Path:
    """A text PDF, one string per page (fpdf2's core font: Latin-1 text only)."""
    from fpdf import FPDF

    doc = FPDF()
    doc.set_font("Helvetica", size=11)
    for text in pages:
        doc.add_page()
        doc.multi_cell(0, 5, text)
    doc.output(str(path))
    return path


def scanned_pdf(path: Path, pages: int = 2) -> Path:
    """A PDF with drawings and no text layer, like a scan."""
    from fpdf import FPDF

    doc = FPDF()
    for _ in range(pages):
        doc.add_page()
        doc.rect(20, 20, 100, 60, style="F")
    doc.output(str(path))
    return path


def encrypted_pdf(path: Path) -> Path:
    from fpdf import FPDF

    doc = FPDF()
    doc.set_encryption(owner_password="owner", user_password="secret")
    doc.set_font("Helvetica", size=11)
    doc.add_page()
    doc.multi_cell(0, 5, "A secret page.")
    doc.output(str(path))
    return path


def docx(path: "Path | object", sections: dict[str, str]) -> Path:
    """A Word file: one Heading 1 and one paragraph per section, plus a small table at the end."""
    import docx as python_docx

    d = python_docx.Document()
    for heading, text in sections.items():
        d.add_heading(heading, level=1)
        d.add_paragraph(text)
    table = d.add_table(rows=2, cols=2)
    for r, row in enumerate([("fruit", "colour"), ("quince", "golden")]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    d.save(path if not isinstance(path, Path) else str(path))
    return path


def pptx(path: Path, slides: list[str]) -> Path:
    import pptx as python_pptx

    deck = python_pptx.Presentation()
    for text in slides:
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = text.split(".")[0]
        slide.placeholders[1].text = text
    deck.save(str(path))
    return path


def xlsx(path: Path, sheets: dict[str, list[list[object]]]) -> Path:
    import openpyxl

    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, rows in sheets.items():
        sheet = book.create_sheet(name)
        for row in rows:
            sheet.append(row)
    book.save(str(path))
    return path


def zip_bomb(path: Path, inflated_bytes: int) -> Path:
    """A .docx-named zip whose one part inflates to `inflated_bytes` of zeros (compressed ~1000x)."""
    chunk = b"\0" * 1_000_000
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("word/document.xml", "w") as part:
        for _ in range(inflated_bytes // len(chunk)):
            part.write(chunk)
    return path


def docx_bomb(path: Path, inflated_bytes: int) -> Path:
    """A valid Word file whose document part inflates to `inflated_bytes` of paragraphs."""
    import io

    real = io.BytesIO()
    docx(real, {"Title": "text"})
    para = b"<w:p><w:r><w:t>" + b"a" * 200 + b"</w:t></w:r></w:p>"
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for item in src.infolist():
            if item.filename != "word/document.xml":
                out.writestr(item, src.read(item))
                continue
            head, tail = src.read(item).split(b"<w:body>")
            with out.open(item.filename, "w") as part:
                part.write(head + b"<w:body>")
                block = para * 5000
                for _ in range(inflated_bytes // len(block)):
                    part.write(block)
                part.write(tail)
    return path


FILLER = [
    "The road wound north between stone walls and orchards.",
    "Rain came in from the west and the river rose a little.",
    "Market stalls sold bread, cheese, wool and copper pots.",
    "An old clock in the square struck each hour twice.",
    "Children ran along the towpath chasing the barges.",
    "The inn kept a fire lit in the long room until midnight.",
]


def long_pages(count: int, facts: dict[int, str], sentences_per_page: int = 30) -> list[str]:
    """`count` pages of varied filler; page n (1-based) also states facts[n]."""
    pages = []
    for n in range(1, count + 1):
        body = [FILLER[(n + i) % len(FILLER)] for i in range(sentences_per_page)]
        if n in facts:
            body.insert(sentences_per_page // 2, facts[n])
        pages.append(f"Page {n}. " + " ".join(body))
    return pages
