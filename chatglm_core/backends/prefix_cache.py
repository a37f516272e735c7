"""Which cached KV a new prompt can start from: entries keyed by token ids, longest common prefix, LRU.

Both local backends keep the KV of finished sequences instead of throwing it away (llama.cpp: the
sequence's cells in its context, `llamacpp_cache`; transformers: the key/value tensors,
`transformers_backend`). A new prompt that begins with an entry's tokens (the previous turn of the
same chat, an agent's earlier round, a shared system prompt or tool list) then prefills only the
rest, as llama-server's `cache_prompt` and vLLM's automatic prefix caching do. This module is the
bookkeeping both share: which entry shares the longest prefix with a prompt, and which one was used
least recently when room is needed. Where the KV lives and how it is copied is the backend's.

Hand-written rather than a radix tree (SGLang's RadixAttention): a backend holds a handful of
entries (8 sequences in a llama.cpp context, a memory budget of conversations on transformers), so
comparing the prompt with each entry is microseconds with numpy, and entries stay whole sequences,
which is the unit both backends store KV in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading token ids `a` and `b` share."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def reusable(matched: int, prompt_len: int) -> int:
    """Prompt tokens a row may take from the cache: all matched ones but the prompt's last, which
    must be fed again so the model returns the logits of the first generated token."""
    return max(0, min(matched, prompt_len - 1))


@dataclass
class Entry:
    ids: np.ndarray  # the token ids whose KV the entry holds, from position 0
    value: Any = None  # the backend's handle on that KV (None where the key is the handle)
    size: int = 0  # bytes it holds, counted against the cache's budget


class PrefixCache:
    """Entries in least-recently-used order (oldest first), at most `max_size` bytes in all."""

    def __init__(self, max_size: int | None = None) -> None:
        self.max_size = max_size
        self.size = 0
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._entries)

    def ids(self, key: Hashable) -> np.ndarray:
        return self._entries[key].ids

    def put(self, key: Hashable, ids: Sequence[int], value: Any = None, size: int = 0) -> list[Entry]:
        """Store (or replace) an entry as the most recently used; returns the entries evicted to keep
        within max_size (an entry bigger than max_size alone is not stored: it is returned too)."""
        self.pop(key)
        entry = Entry(np.asarray(ids, dtype=np.int64), value, size)
        if self.max_size is not None and size > self.max_size:
            return [entry]
        self._entries[key] = entry
        self.size += size
        evicted = []
        while self.max_size is not None and self.size > self.max_size:
            evicted.append(self.pop(next(iter(self._entries))))
        return evicted

    def pop(self, key: Hashable) -> Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.size -= entry.size
        return entry

    def touch(self, key: Hashable) -> None:
        self._entries.move_to_end(key)

    def get(self, key: Hashable) -> Entry:
        return self._entries[key]

    def covering(self, ids: Sequence[int]) -> Hashable | None:
        """An entry that holds all of `ids` (and maybe more): storing `ids` too would add nothing."""
        key, matched = self.match(ids)
        return key if key is not None and matched == len(ids) else None

    def prefixes_of(self, ids: Sequence[int]) -> list[Hashable]:
        """Entries wholly contained in `ids`: an entry for `ids` makes them redundant."""
        query = np.asarray(ids, dtype=np.int64)
        return [k for k, e in self._entries.items() if common_prefix(query, e.ids) == len(e.ids)]

    def match(self, ids: Sequence[int] | np.ndarray) -> tuple[Hashable | None, int]:
        """(key of the entry sharing the longest prefix with `ids`, its length); (None, 0) when none
        shares a token. Ties go to the most recently used entry."""
        query = np.asarray(ids, dtype=np.int64)
        best, best_len = None, 0
        for key, entry in self._entries.items():  # oldest first: a later tie replaces an earlier one
            n = common_prefix(query, entry.ids)
            if n and n >= best_len:
                best, best_len = key, n
        return best, best_len

    def oldest(self, exclude: Hashable | None = None) -> Hashable | None:
        """The least recently used key (other than `exclude`), or None."""
        return next((k for k in self._entries if k != exclude), None)
