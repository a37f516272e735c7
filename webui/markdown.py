"""Model text → Markdown that Streamlit renders safely, with LaTeX and code highlighting.

Pure functions (no Streamlit import), so they are tested table-style.

- ``\\( x \\)`` and ``\\[ x \\]`` (what models write) become ``$x$`` and ``$$x$$`` (what Streamlit's
  KaTeX reads).
- ``<`` outside code and math becomes ``&lt;``: a reply containing ``<script>`` or
  ``<img onerror=…>`` shows as text. Streamlit's own markdown (unsafe_allow_html=False) escapes
  HTML too; this is the second lock on the same door, and it does not depend on Streamlit's
  defaults. Code blocks and inline code are left untouched, so code shows exactly as written.
"""

from __future__ import annotations

import re

# a fenced block: from an opening ``` / ~~~ line to its closing fence, or to the end of the text
# (while a reply streams, its last block is not closed yet)
_FENCE = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})[^\n]*\n.*?(?:^[ \t]{0,3}\1[ \t]*$|\Z)", re.M | re.S)
# inline code, display math and inline math: kept verbatim
_VERBATIM = re.compile(r"(`+)(?:.+?)\1|\$\$.+?\$\$|\$[^\s$](?:[^$\n]*[^\s$])?\$", re.S)
_DISPLAY = re.compile(r"\\\[(.+?)\\\]", re.S)
_INLINE = re.compile(r"\\\((.+?)\\\)", re.S)


def to_markdown(text: str) -> str:
    """The Markdown to hand to ``st.markdown`` for a piece of model text."""
    out, pos = [], 0
    for fence in _FENCE.finditer(text):
        out.append(_prose(text[pos:fence.start()]))
        out.append(fence.group(0))
        pos = fence.end()
    out.append(_prose(text[pos:]))
    return "".join(out)


def _prose(text: str) -> str:
    text = _DISPLAY.sub(lambda m: "\n$$\n" + m.group(1).strip() + "\n$$\n", text)
    text = _INLINE.sub(lambda m: "$" + m.group(1).strip() + "$", text)
    out, pos = [], 0
    for verbatim in _VERBATIM.finditer(text):
        out.append(escape_html(text[pos:verbatim.start()]))
        out.append(verbatim.group(0))
        pos = verbatim.end()
    out.append(escape_html(text[pos:]))
    return "".join(out)


def escape_html(text: str) -> str:
    """Make every tag plain text; markdown shows ``&lt;`` as ``<``."""
    return text.replace("<", "&lt;")
