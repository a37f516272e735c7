"""Chat with documents: parse → chunk → index → search, and the passages a prompt is given.

    from chatglm_core.documents import DocumentIndex
    index = DocumentIndex()                 # the embedded all-MiniLM-L6-v2, in memory
    index.add("report.pdf")                 # a Document; RequestError/ConfigError with a clear message
    index.search("when was it signed?", k=5)  # [Passage(text, source, page, score, section)], best first

No Streamlit here: the app (webui/attachments.py) and the tests use this API.
"""

from chatglm_core.documents.index import Document, DocumentIndex, Passage
from chatglm_core.documents.parse import EXTENSIONS, ParseLimits
from chatglm_core.documents.prompt import DocumentContext, build_context

__all__ = ["EXTENSIONS", "Document", "DocumentContext", "DocumentIndex", "ParseLimits", "Passage", "build_context"]
