"""Model text → safe Markdown: LaTeX delimiters converted, HTML shown as text, code untouched."""

from __future__ import annotations

import pytest

from webui.markdown import to_markdown


@pytest.mark.parametrize("text, expected", [
    ("plain text", "plain text"),
    (r"Euler: \(e^{i\pi}+1=0\).", "Euler: $e^{i\\pi}+1=0$."),
    (r"\[ \int_0^1 x\,dx \]", "\n$$\n\\int_0^1 x\\,dx\n$$\n"),
    ("<script>alert(1)</script>", "&lt;script>alert(1)&lt;/script>"),
    ('<img src=x onerror="alert(1)">', '&lt;img src=x onerror="alert(1)">'),
    ("a `<b>` code span", "a `<b>` code span"),
    ("```html\n<p>hi</p>\n```\nthen <i>", "```html\n<p>hi</p>\n```\nthen &lt;i>"),
    ("streaming ```python\nnot a fence", "streaming ```python\nnot a fence"),
    ("```python\nif a < b:\n    pass", "```python\nif a < b:\n    pass"),  # unclosed while streaming
    ("$a<b$ and $$x<y$$ but <u>", "$a<b$ and $$x<y$$ but &lt;u>"),
    (r"\(a<b\)", "$a<b$"),
    ("price $5 and <b>", "price $5 and &lt;b>"),
    ("~~~\n<x>\n~~~\n<y>", "~~~\n<x>\n~~~\n&lt;y>"),
])
def test_to_markdown(text, expected):
    assert to_markdown(text) == expected
