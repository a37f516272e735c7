"""Which strategy a question gets, and the prompt text with numbered passages the UI can cite.

Whole document when all attached text fits the model's context with room for the conversation and
the answer (what "summarise this" needs: every page, in order); otherwise retrieval: the top
passages of the hybrid search. Either way the model reads numbered passages, "[1] report.pdf,
page 3", and the same numbers are shown under the reply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from chatglm_core.documents.index import DocumentIndex, Passage

Strategy = Literal["whole", "retrieval"]

INSTRUCTIONS = ("Answer the question using the numbered passages from the user's documents below. "
                "Cite the passages you use by their numbers, like [1]. If they do not contain the answer, say so.")


@dataclass
class DocumentContext:
    strategy: Strategy
    passages: list[Passage] = field(default_factory=list)

    def prompt(self, question: str) -> str:
        """The user turn the model reads: instructions, numbered passages, then the question."""
        blocks = [f"[{n}] {p.where}:\n{p.text.strip()}" for n, p in enumerate(self.passages, 1)]
        return f"{INSTRUCTIONS}\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}"

    def describe(self) -> str:
        if self.strategy == "whole":
            names = sorted({p.source for p in self.passages})
            return f"whole document{'s' if len(names) > 1 else ''} in the prompt ({', '.join(names)})"
        return f"retrieval: the {len(self.passages)} best-matching passages (BM25 + embeddings)"

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "passages": [asdict(p) for p in self.passages]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DocumentContext:
        return cls(data["strategy"], [Passage(**p) for p in data["passages"]])


def build_context(index: DocumentIndex, question: str, *, budget_tokens: int, count_tokens: Callable[[str], int],
                  k: int = 5) -> DocumentContext | None:
    """The passages for `question`: whole documents if their prompt fits `budget_tokens`, else the top `k`.

    None when the index holds no documents.
    """
    if not index.documents:
        return None
    whole = DocumentContext("whole", whole_passages(index))
    text = whole.prompt(question)
    # a rough upper bound first: no tokenizer packs more than ~6 characters into a token, so a
    # long document is sent to retrieval without tokenizing all of it
    if len(text) <= budget_tokens * 6 and count_tokens(text) <= budget_tokens:
        return whole
    return DocumentContext("retrieval", index.search(question, k=k))


def whole_passages(index: DocumentIndex) -> list[Passage]:
    """Every section of every document in order: one passage per page, slide, sheet or heading."""
    return [Passage(s.text.strip(), doc.name, s.page, 1.0, s.section)
            for doc in index.documents for s in doc.sections if s.text.strip()]
