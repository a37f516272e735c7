"""What one cell produced: the `ExecResult` dataclass and the collector that builds it within limits.

Every output message of a run counts, in order (ChatGLM3's demo kept only the last one): streams,
execute results, displays (text/plain; HTML, markdown or JSON when the plain text is a bare repr),
PNG images, and the traceback without ANSI colour codes. Text over the limit keeps its first two
thirds and its last third around a marker, so both the start and the final lines survive.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Literal

Status = Literal["ok", "error", "timeout", "died"]
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
TRUNCATED = "[... output truncated: {n} characters not shown ...]"


@dataclass
class ExecResult:
    status: Status
    text: str = ""  # streams and displayed text, in order
    images: list[bytes] = field(default_factory=list)  # PNG bytes, in order
    error: str | None = None  # traceback (no ANSI codes) or what happened to the kernel
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def observation(self) -> str:
        """What the model reads back: one "[Image]" per image, then the text, then the error."""
        parts = ["[Image]"] * len(self.images)
        if self.text.strip():
            parts.append(self.text.rstrip())
        if self.error:
            parts.append(self.error)
        return "\n".join(parts) if parts else "(no output)"


def truncate(text: str, limit: int) -> str:
    """Keep the first two thirds and the last third of `limit` characters, marking the cut."""
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 3
    return text[:head] + "\n" + TRUNCATED.format(n=len(text) - head - tail) + "\n" + text[len(text) - tail:]


class _HTMLText(HTMLParser):
    BLOCKS = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre"})

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self._skip += tag in ("script", "style")
        if tag in self.BLOCKS:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append("\t")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    lines = (line.strip() for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def _display_text(data: dict[str, Any]) -> str:
    """The text of a rich display: text/plain unless it is a bare repr and there is HTML/markdown."""
    plain = data.get("text/plain", "")
    if re.fullmatch(r"<[\w.]+ object(?: at 0x[0-9a-f]+)?>", plain.strip()) or not plain:
        if "text/html" in data:
            return html_to_text(data["text/html"])
        for mime in ("text/markdown", "text/latex", "application/json"):
            if mime in data:
                return str(data[mime])
    return plain


class Output:
    """Collects one execution's messages within the size limits."""

    def __init__(self, max_chars: int, max_images: int, max_image_bytes: int) -> None:
        self.max_chars, self.max_images, self.max_image_bytes = max_chars, max_images, max_image_bytes
        self.head: list[str] = []
        self.head_len = 0
        self.tail = ""
        self.dropped = 0
        self.images: list[bytes] = []
        self.images_dropped = 0
        self.error: str | None = None

    def add_text(self, text: str) -> None:
        room = self.max_chars * 2 // 3 - self.head_len
        if room > 0:
            self.head.append(text[:room])
            self.head_len += min(room, len(text))
            text = text[room:]
        if text:
            tail_len = self.max_chars // 3
            joined = self.tail + text
            self.dropped += max(0, len(joined) - tail_len)
            self.tail = joined[-tail_len:] if tail_len else ""

    def add_display(self, data: dict[str, Any]) -> None:
        if "image/png" in data:
            png = base64.b64decode(data["image/png"])
            if len(self.images) >= self.max_images:
                self.images_dropped += 1
            elif len(png) > self.max_image_bytes:
                self.add_text(f"[image of {len(png)} bytes not shown: over {self.max_image_bytes} bytes]\n")
            else:
                self.images.append(png)
            return
        text = _display_text(data)
        if text:
            last = self.tail or (self.head[-1] if self.head else "")
            self.add_text(("\n" if last and not last.endswith("\n") else "") + text + "\n")

    def add_error(self, content: dict[str, Any]) -> None:
        trace = ANSI.sub("", "\n".join(content.get("traceback") or []))
        self.error = truncate(trace or f"{content.get('ename')}: {content.get('evalue')}", self.max_chars)

    def result(self, status: Status, started: float, error: str | None = None) -> ExecResult:
        text = "".join(self.head)
        if self.dropped:
            text += "\n" + TRUNCATED.format(n=self.dropped) + "\n"
        text += self.tail
        if self.images_dropped:
            text += f"[{self.images_dropped} more image(s) not shown: the limit is {self.max_images}]\n"
        return ExecResult(status, text, self.images, error or self.error, time.monotonic() - started)
