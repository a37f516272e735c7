"""Documents attached to a conversation: the upload panel, the prompt with passages, the citations.

A conversation's documents live in the store with it (`chatglm_core.store.DocumentStore`), so a
refresh or a restart keeps them and deleting the conversation deletes them. The index is built
once per conversation per session; the embedding model is loaded once per process, on the first
upload or question. Which passages each question was given is stored too, and shown under the
reply with the numbers the model saw.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import streamlit as st

from chatglm_core.documents import EXTENSIONS, DocumentContext, DocumentIndex, ParseLimits, build_context
from chatglm_core.engine import Engine
from chatglm_core.errors import ChatGLMError
from chatglm_core.messages import Message, Role
from chatglm_core.store import Conversation, DocumentStore
from webui import state
from webui.bubbles import escape_md

ANSWER_ROOM = 64  # tokens kept free besides max_new_tokens (the template's own tokens)


@st.cache_resource(show_spinner=False)
def embedder():
    from chatglm_core.api.embeddings import Embedder

    s = state.settings()
    return Embedder(s.embedding_path, device=s.device)


def document_store() -> DocumentStore:
    return _document_store(str(state.store().path))


@st.cache_resource(show_spinner=False)
def _document_store(path: str) -> DocumentStore:  # keyed by the file: the store's data dir can change
    return DocumentStore(state.store())


def index_for(conv: Conversation) -> DocumentIndex:
    """This conversation's index (loaded from the store on first use in this session)."""
    key = f"docindex_{conv.id}"
    if key not in st.session_state:
        st.session_state[key] = DocumentIndex(embedder(), store=document_store(), client_id=conv.client_id,
                                              conversation_id=conv.id,
                                              limits=ParseLimits.from_settings(state.settings()))
    return st.session_state[key]


# --- the panel ----------------------------------------------------------------------------------
def panel(conv: Conversation) -> None:
    """The attached documents (each removable) and the uploader."""
    try:
        index = index_for(conv)
    except ChatGLMError as e:  # e.g. re-embedding stored documents under a missing EMBEDDING_PATH
        st.error(f"The attached documents could not be loaded: {e}")
        return
    with st.container(border=True, key="documents"):
        for doc in index.documents:
            c1, c2 = st.columns([6, 1])
            pages = f", {doc.pages} pages" if doc.pages else ""
            c1.caption(f":material/description: **{escape_md(doc.name)}** ({doc.chunks} passages{pages})")
            c2.button("", key=f"rmdoc_{doc.id}", icon=":material/close:", help="Remove this document",
                      on_click=index.remove, args=(doc.id,))
        n = st.session_state.setdefault("docs_upload_n", 0)
        files = st.file_uploader("Attach documents (PDF, Word, slides, sheets, HTML, Markdown, text)",
                                 type=sorted(e.lstrip(".") for e in EXTENSIONS), accept_multiple_files=True,
                                 key=f"docs_upload_{n}")
        for note in st.session_state.pop("docs_notes", []):
            (st.error if note.startswith("!") else st.caption)(note.lstrip("!"))
    if files:
        _attach(conv, index, files)


def _attach(conv: Conversation, index: DocumentIndex, files: list) -> None:
    notes = []
    for f in files:
        with st.spinner(f"Reading {f.name}…"):
            try:
                doc = _add(index, f.name, f.getvalue())
                notes.append(f":material/check: attached {escape_md(doc.name)}: {doc.chunks} passages")
            except ChatGLMError as e:  # a bad file is refused with the reason (naming it); the session goes on
                why = str(e) if f.name in str(e) else f"{f.name}: {e}"
                notes.append(f"!Not attached. {why}")
    if index.documents and not conv.messages:
        # the conversation must be stored: it owns its documents (deleting it deletes them)
        conv.title = conv.title or index.documents[0].name
        state.store().save(conv)
    st.session_state["docs_notes"] = notes
    st.session_state["docs_upload_n"] += 1  # a fresh uploader: the files are in the index now
    st.rerun()


def _add(index: DocumentIndex, name: str, data: bytes):
    with tempfile.TemporaryDirectory(prefix="chatglm-doc-") as tmp:
        path = Path(tmp) / ("upload" + Path(name).suffix.lower())
        path.write_bytes(data)
        return index.add(path, name=Path(name).name)


# --- a turn -------------------------------------------------------------------------------------
def prepare(conv: Conversation, engine: Engine, messages: list[Message], max_new_tokens: int
            ) -> tuple[list[Message], DocumentContext | None]:
    """`messages` with the last user turn carrying the documents' passages, and what was given."""
    index = index_for(conv)
    last = max((i for i, m in enumerate(messages) if m.role is Role.USER), default=None)
    if not index.documents or last is None:
        return messages, None
    backend = engine.backend
    window = getattr(backend, "context_window", None) or 4096  # unknown (remote): assume a small one

    def count(text: str) -> int:
        return backend.count_tokens([Message(Role.USER, text)])

    others = backend.count_tokens(messages[:last] + messages[last + 1:]) if len(messages) > 1 else 0
    budget = window - max_new_tokens - others - ANSWER_ROOM
    question = messages[last].content
    with st.spinner("Searching the documents…"):
        try:
            context = build_context(index, question, budget_tokens=budget, count_tokens=count,
                                    k=state.settings().documents_top_k)
        except ChatGLMError as e:  # the embedding model failed: answer without the documents, and say so
            st.warning(f"The documents could not be searched ({e}); this reply does not use them.")
            return messages, None
    if context is None:
        return messages, None
    user_index = max(i for i, m in enumerate(conv.messages) if m.role is Role.USER)
    document_store().save_turn(conv.client_id, conv.id, user_index, context.to_dict())
    given = list(messages)
    given[last] = Message(Role.USER, context.prompt(question))
    return given, context


def show_context(context: DocumentContext) -> None:
    """The strategy and the numbered passages the model was given (text on expand)."""
    st.caption(f":material/description: Documents: {context.describe()}")
    for n, p in enumerate(context.passages, 1):
        with st.expander(f"[{n}] {p.where}"):
            st.text(p.text)


def citations(conv: Conversation) -> Callable[[int, Message], None]:
    """For the history: under the first reply to each user message, the passages it was given."""
    turns = document_store().turns(conv.client_id, conv.id) if conv.messages else {}

    def after(i: int, m: Message) -> None:
        if m.role is not Role.ASSISTANT or not turns:
            return
        j = i - 1
        while j >= 0 and conv.messages[j].role is not Role.USER:
            if conv.messages[j].role is Role.ASSISTANT:
                return  # not the first reply after the question
            j -= 1
        if j in turns:
            show_context(DocumentContext.from_dict(turns[j]))

    return after
