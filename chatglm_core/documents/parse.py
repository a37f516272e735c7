"""Parsing a file safely: pick the reader by extension, run it in a limited child process.

The readers themselves live in `extract.py`. Here: the size check before anything is read, and the
child process (``python -I extract.py``) with a wall-clock timeout and an address-space limit,
so a zip bomb, a parser hang or a crash on a hostile file ends in a `RequestError` that says what
happened, and the app (and every other session) goes on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatglm_core.errors import RequestError

EXTENSIONS = {
    ".pdf": "pdf", ".docx": "docx", ".pptx": "pptx", ".xlsx": "xlsx", ".xlsm": "xlsx", ".csv": "csv", ".tsv": "csv",
    ".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown", ".txt": "text", ".text": "text",
    ".rst": "text", ".log": "text",
}
_EXTRACT = Path(__file__).with_name("extract.py")


@dataclass(frozen=True)
class ParseLimits:
    max_bytes: int = 50_000_000  # the file as uploaded
    max_pages: int = 2000  # PDF pages, slides
    max_chars: int = 5_000_000  # extracted text
    max_unzipped: int = 300_000_000  # an Office file's parts, inflated
    timeout: float = 60.0  # seconds for one file
    memory_mb: int = 2048  # the child's address space

    @classmethod
    def from_settings(cls, settings: Any) -> ParseLimits:
        return cls(max_bytes=settings.documents_max_bytes, max_pages=settings.documents_max_pages,
                   max_chars=settings.documents_max_chars, timeout=settings.documents_timeout)


@dataclass(frozen=True)
class Section:
    """A page (PDF, slide), a heading's section (Word, HTML, Markdown), a sheet, or the whole text."""
    text: str
    page: int | None = None
    section: str | None = None


def kind_of(name: str) -> str:
    """The reader for a file name; RequestError listing what is accepted when there is none."""
    kind = EXTENSIONS.get(Path(name).suffix.lower())
    if kind is None:
        accepted = ", ".join(sorted(EXTENSIONS))
        raise RequestError(f"{Path(name).name}: this file type can't be read; accepted: {accepted}")
    return kind


def parse_file(path: Path | str, limits: ParseLimits | None = None, *, name: str | None = None) -> list[Section]:
    """The file's text as sections; RequestError (naming the file) for anything unreadable."""
    limits = limits or ParseLimits()
    path = Path(path)
    label = name or path.name
    kind = kind_of(label)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise RequestError(f"{label}: can't open it ({e.strerror})") from None
    if size > limits.max_bytes:
        raise RequestError(f"{label}: {size:,} bytes is over the limit of {limits.max_bytes:,} "
                           "(CHATGLM_DOCUMENTS_MAX_BYTES)")
    if size == 0:
        raise RequestError(f"{label}: the file is empty")
    result = _run_child(path, kind, limits, label)
    if "error" in result:
        raise RequestError(f"{label}: {result['error']}")
    return [Section(s["text"], s["page"], s["section"]) for s in result["sections"]]


def _run_child(path: Path, kind: str, limits: ParseLimits, label: str) -> dict:
    args = [sys.executable, "-I", str(_EXTRACT), str(path), kind, str(limits.max_pages), str(limits.max_chars),
            str(limits.max_unzipped), str(limits.memory_mb)]
    try:
        done = subprocess.run(args, capture_output=True, timeout=limits.timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise RequestError(f"{label}: reading it took longer than {limits.timeout:g} s and was stopped "
                           "(a damaged or hostile file? CHATGLM_DOCUMENTS_TIMEOUT sets the limit)") from None
    try:
        return json.loads(done.stdout)
    except ValueError:
        pass
    if done.returncode < 0 or b"MemoryError" in done.stderr:
        why = "it needed more memory than the limit allows" if b"MemoryError" in done.stderr else "the parser crashed"
        raise RequestError(f"{label}: {why} (a damaged or hostile file?); nothing was added")
    raise RequestError(f"{label}: the parser failed ({done.stderr.decode(errors='replace').strip()[-300:]})")

