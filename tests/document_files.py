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


def docx(path: Path, sections: dict[str, str]) -> Path:
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
    d.save(str(path))
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
