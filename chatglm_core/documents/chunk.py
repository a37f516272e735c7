"""Sections → overlapping chunks, and text → lexical tokens (words; CJK characters and their bigrams).

Hand-written, because the splitters that exist come inside large frameworks (LangChain,
LlamaIndex) and the rule here is short: pack whole sentences up to a size, carry the last
sentences over as overlap, never cross a page or section (so a chunk cites one place), and cut a
sentence only when it alone is over the size. Sizes are in estimated tokens: a word, a
punctuation mark, or a CJK character each count one, close to how the embedding model's
WordPiece tokenizer counts and language-independent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from chatglm_core.documents.parse import Section

CHUNK_TOKENS = 180  # all-MiniLM-L6-v2 reads 256 word pieces; leave room for sub-word splits
OVERLAP_TOKENS = 40

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")
_SENTENCE_END = re.compile(r"(?<=[.!?;。！？；…])\s*|\n\s*\n|\n(?=\s*[-*•\d])")
_CJK_RUN = re.compile(rf"[{_CJK}]+")
_WORD = re.compile(rf"[^\W_{_CJK}]+|[{_CJK}]+")


@dataclass(frozen=True)
class Chunk:
    text: str
    page: int | None
    section: str | None


def estimate_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def chunk_sections(sections: list[Section], size: int = CHUNK_TOKENS, overlap: int = OVERLAP_TOKENS) -> list[Chunk]:
    return [Chunk(text, s.page, s.section) for s in sections for text in chunk_text(s.text, size, overlap)]


def chunk_text(text: str, size: int = CHUNK_TOKENS, overlap: int = OVERLAP_TOKENS) -> list[str]:
    pieces = [p for s in _sentences(text) for p in _cut(s, size)]
    chunks: list[str] = []
    current: list[tuple[str, int]] = []
    for piece in pieces:
        n = estimate_tokens(piece)
        if current and sum(c for _, c in current) + n > size:
            chunks.append(_join(current))
            current = _tail(current, overlap)
        current.append((piece, n))
    if current:  # it always holds a new piece after the overlap
        chunks.append(_join(current))
    return [c for c in chunks if c.strip()]


def _sentences(text: str) -> list[str]:
    text = re.sub(r"[ \t\f\v]+", " ", text)
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _cut(sentence: str, size: int) -> list[str]:
    """A sentence over `size` tokens, cut into pieces of `size` tokens (keeping the original spacing)."""
    spans = [m.span() for m in _TOKEN.finditer(sentence)]
    if len(spans) <= size:
        return [sentence]
    return [sentence[spans[i][0]:spans[min(i + size, len(spans)) - 1][1]] for i in range(0, len(spans), size)]


def _tail(current: list[tuple[str, int]], overlap: int) -> list[tuple[str, int]]:
    """The last sentences whose tokens add up to at most `overlap`."""
    out: list[tuple[str, int]] = []
    total = 0
    for piece, n in reversed(current):
        if total + n > overlap:
            break
        out.insert(0, (piece, n))
        total += n
    return out


def _join(pieces: list[tuple[str, int]]) -> str:
    out = ""
    for piece, _ in pieces:
        # no space between Chinese sentences, one between others
        out += ("" if not out or _CJK_RUN.fullmatch(out[-1]) or _CJK_RUN.match(piece[0]) else " ") + piece
    return out


# --- lexical tokens for BM25 --------------------------------------------------------------------
_STOPWORDS = frozenset(
    "a an and are as at be but by for from has have he her his i if in into is it its of on or she so that the "
    "their them then there these they this to was were what when where which who whom why will with would you "
    "does did do how 的 了 是 在 和 与 也 就 都 而 及 之 其 者 也 乎 矣 哉 焉 吗 呢 什么 谁 哪 哪里".split())


def lexical_tokens(text: str) -> list[str]:
    """Lower-cased words; a run of Chinese (CJK) characters gives its characters and character bigrams.

    Unigrams + bigrams, as Lucene's CJK analysers do, rather than a word segmenter: on the
    benchmark's classical Chinese passages asked in modern Chinese, BM25 found the passage in the
    top 5 for 13 of 14 questions this way and for 3 of 14 with jieba's search-mode words
    (benchmarks/bench_documents.py). It needs no dictionary and treats every CJK language alike.
    """
    out: list[str] = []
    for m in _WORD.finditer(text.lower()):
        word = m.group()
        if _CJK_RUN.fullmatch(word):
            out += [c for c in word if c not in _STOPWORDS]
            out += [word[i:i + 2] for i in range(len(word) - 1)]
        elif word not in _STOPWORDS:
            out.append(word)
    return out
