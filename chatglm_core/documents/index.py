"""`DocumentIndex`: a conversation's documents, searchable by BM25, by embeddings, or both fused.

Lexical search is bm25s over `chunk.lexical_tokens` (CJK: characters + bigrams); dense search is cosine
similarity of the embedding model's normalised vectors (the embedded all-MiniLM-L6-v2, or
``EMBEDDING_PATH``). Hybrid ranks by reciprocal rank fusion (RRF, k=60: Cormack et al., 2009),
which needs no tuning between the two scales of scores. Everything is kept in memory (a few
thousand chunks search in milliseconds); with a store the index is saved as it grows and loaded
back for the same browser and conversation.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from chatglm_core.documents.chunk import Chunk, chunk_sections, lexical_tokens
from chatglm_core.documents.parse import ParseLimits, Section, parse_file
from chatglm_core.errors import RequestError

RRF_K = 60
Mode = Literal["hybrid", "lexical", "dense"]


@dataclass(frozen=True)
class Passage:
    text: str
    source: str  # the file name
    page: int | None  # 1-based; None where the format has no pages
    score: float
    section: str | None = None  # a heading, "slide 3", "sheet Totals"

    @property
    def where(self) -> str:
        """Where it is, as the citations show it: "report.pdf, page 3"."""
        place = self.section if self.section and (self.page is None or self.section.startswith("slide")) else (
            f"page {self.page}" if self.page is not None else None)
        return f"{self.source}, {place}" if place else self.source


@dataclass(frozen=True)
class Document:
    id: str
    name: str
    sections: list[Section]
    chunks: int

    @property
    def pages(self) -> int | None:
        return max((s.page for s in self.sections if s.page is not None), default=None)


class DocumentIndex:
    """Parse → chunk → index → search. `store`/`client_id`/`conversation_id` make it persistent."""

    def __init__(self, embedder: Any = None, *, store: Any = None, client_id: str = "", conversation_id: str = "",
                 limits: ParseLimits | None = None) -> None:
        if embedder is None:
            from chatglm_core.api.embeddings import Embedder

            embedder = Embedder()
        self.embedder = embedder
        self.store, self.client_id, self.conversation_id = store, client_id, conversation_id
        self.limits = limits or ParseLimits()
        self.documents: list[Document] = []
        self._chunks: list[tuple[Chunk, str, str]] = []  # (chunk, document name, document id)
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        self._bm25: Any = None
        if store is not None:
            self._load()

    def add(self, path: Path | str, name: str | None = None) -> Document:
        """Parse and index one file; RequestError (bad file) or ConfigError (no embedding model)."""
        name = name or Path(path).name
        sections = parse_file(path, self.limits, name=name)
        chunks = chunk_sections(sections)
        if not chunks:
            raise RequestError(f"{name}: no text found in it")
        vectors = self._embed([c.text for c in chunks])
        doc_id = self._save(name, sections, chunks, vectors)
        doc = Document(doc_id, name, sections, len(chunks))
        self._append(doc, chunks, vectors)
        return doc

    def remove(self, document_id: str) -> None:
        if self.store is not None:
            self.store.remove(self.client_id, document_id)
        keep = [i for i, (_, _, d) in enumerate(self._chunks) if d != document_id]
        self._chunks = [self._chunks[i] for i in keep]
        self._vectors = self._vectors[keep] if keep else np.zeros((0, 0), dtype=np.float32)
        self.documents = [d for d in self.documents if d.id != document_id]
        self._bm25 = None

    def search(self, query: str, k: int = 5, mode: Mode = "hybrid") -> list[Passage]:
        """The `k` passages that best match `query`, best first."""
        if not self._chunks or not query.strip():
            return []
        if mode == "lexical":
            ranked = self._lexical(query)
        elif mode == "dense":
            ranked = self._dense(query)
        else:
            depth = max(50, 10 * k)
            ranked = _fuse([self._lexical(query)[:depth], self._dense(query)[:depth]])
        return [self._passage(i, score) for i, score in ranked[:k]]

    # --- ranking ----------------------------------------------------------------------------
    def _lexical(self, query: str) -> list[tuple[int, float]]:
        tokens = lexical_tokens(query)
        if not tokens:
            return []
        if self._bm25 is None:
            import bm25s

            self._bm25 = bm25s.BM25()
            self._bm25.index([lexical_tokens(c.text) for c, _, _ in self._chunks], show_progress=False)
        known = [t for t in tokens if t in self._bm25.vocab_dict]
        if not known:
            return []
        scores = self._bm25.get_scores(known)
        order = np.argsort(-scores, kind="stable")
        return [(int(i), float(scores[i])) for i in order if scores[i] > 0]

    def _dense(self, query: str) -> list[tuple[int, float]]:
        q = self._embed([query])[0]
        scores = self._vectors @ q
        order = np.argsort(-scores, kind="stable")
        return [(int(i), float(scores[i])) for i in order]

    def _passage(self, i: int, score: float) -> Passage:
        chunk, source, _ = self._chunks[i]
        return Passage(chunk.text, source, chunk.page, round(score, 6), chunk.section)

    # --- bookkeeping ------------------------------------------------------------------------
    def _embed(self, texts: list[str]) -> np.ndarray:
        vectors, _ = self.embedder.embed(texts)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)

    def _append(self, doc: Document, chunks: list[Chunk], vectors: np.ndarray) -> None:
        self.documents.append(doc)
        self._chunks += [(c, doc.name, doc.id) for c in chunks]
        self._vectors = vectors if self._vectors.size == 0 else np.vstack([self._vectors, vectors])
        self._bm25 = None

    def _save(self, name: str, sections: list[Section], chunks: list[Chunk], vectors: np.ndarray) -> str:
        if self.store is None:
            return uuid.uuid4().hex
        from chatglm_core.store import StoredChunk

        stored = [StoredChunk(c.text, c.page, c.section, v.astype("<f4").tobytes()) for c, v in zip(chunks, vectors)]
        return self.store.add(self.client_id, self.conversation_id, name, [asdict(s) for s in sections], stored,
                              self._model_name)

    def _load(self) -> None:
        for doc_id, name, sections, model in self.store.documents(self.client_id, self.conversation_id):
            stored = self.store.chunks(self.client_id, doc_id)
            chunks = [Chunk(c.text, c.page, c.section) for c in stored]
            if not stored:
                continue
            if model == self._model_name:
                vectors = np.stack([np.frombuffer(c.vector, dtype="<f4") for c in stored])
            else:  # indexed under another EMBEDDING_PATH: its vectors mean nothing to this model
                vectors = self._embed([c.text for c in chunks])
                self.store.replace_vectors(self.client_id, doc_id, [v.astype("<f4").tobytes() for v in vectors],
                                           self._model_name)
            self._append(Document(doc_id, name, [Section(**s) for s in sections], len(chunks)), chunks, vectors)

    @property
    def _model_name(self) -> str:
        return str(getattr(self.embedder, "path", None) or getattr(self.embedder, "name", ""))


def _fuse(rankings: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: each list gives 1 / (RRF_K + rank) to the items it ranks."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (i, _) in enumerate(ranking, 1):
            fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: -item[1])
