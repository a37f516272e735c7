"""Which llama.cpp sequence a new row gets, and the prompt prefixes the idle ones keep cached.

A llama.cpp context holds N sequences, each with its own KV cells (`kv_unified=False`, so a
batched row sees exactly its single stream's keys). A finished row's sequence is not wiped: it
becomes a cache entry holding the KV of the token ids it was fed (prompt and reply). A new row
then starts from the entry that shares the longest prefix with its prompt:

- the entry is wholly a prefix of the prompt (a chat's next turn, an agent's next round): the row
  takes the sequence over and feeds only the rest;
- the prompt diverges inside the entry (a shared system prompt or tool list, a regenerated
  reply): the entry is kept for whoever continues it and its cells are copied to another sequence
  (`llama_memory_seq_cp`; across sequences llama.cpp copies the whole stream, 94 MB for SmolLM2
  at 4,096 cells), then `llama_memory_seq_rm` drops the copy's tail after the shared part. The
  copy cost about what prefilling 4 tokens costs here, so below COPY_MIN shared tokens the row
  starts cold instead;
- at least the prompt's last token is always fed again, for the logits of the first reply token.

Empty sequences are used first, then the least recently used entry is evicted. Everything here
runs under the backend's lock (the batch thread and a direct `stream` may both use the context).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol

from chatglm_core.backends.prefix_cache import PrefixCache, reusable

#: Shared prompt tokens below which a new row starts cold rather than copying a diverging entry.
COPY_MIN = 16


class Memory(Protocol):
    """The two llama.cpp memory calls the pool needs (the backend's context)."""

    def seq_rm(self, seq: int, p0: int, p1: int) -> bool: ...

    def seq_cp(self, src: int, dst: int) -> None: ...


class SequencePool:
    def __init__(self, n: int, memory: Memory, lock: threading.RLock, *, cache: bool = True) -> None:
        self.memory, self.lock = memory, lock
        self.caching = cache
        self.free = list(range(n))  # empty sequences
        self.busy: set[int] = set()  # sequences rows are using
        self.tokens: dict[int, list[int]] = {}  # busy sequence -> the ids whose KV it holds, from position 0
        self.cache = PrefixCache()  # idle sequence -> its ids

    def acquire(self, ids: list[int], *, reuse: bool = True) -> tuple[int, int]:
        """A sequence for a row whose prompt is `ids`: (sequence, prompt tokens already in its KV).
        RuntimeError when every sequence is busy."""
        with self.lock:
            seq, reused = self._reuse(ids) if self.caching and reuse else (None, 0)
            if seq is None:
                seq = self._empty()
                if seq is None:
                    raise RuntimeError("all llama.cpp sequences are in use")
            self.busy.add(seq)
            self.tokens[seq] = list(ids[:reused])
            return seq, reused

    def release(self, seq: int, *, keep: bool = True) -> None:
        """A row is done with `seq`: keep its KV as a cache entry (unless an entry already covers
        it), else wipe it."""
        with self.lock:
            self.busy.discard(seq)
            ids = self.tokens.pop(seq, [])
            if not (self.caching and keep and ids) or self.cache.covering(ids) is not None:
                self._wipe(seq)
                return
            for key in self.cache.prefixes_of(ids):  # entries it extends are redundant now
                self.cache.pop(key)
                self._wipe(key)
            self.cache.put(seq, ids)

    def fed(self, items: Iterable[tuple[int, int, int, bool]]) -> None:
        """Record decoded (token, position, sequence, _) items: what each sequence's KV now holds."""
        with self.lock:
            for tok, pos, seq, _ in items:
                held = self.tokens.get(seq)
                if held is None:
                    continue
                if pos < len(held):
                    del held[pos:]
                if pos == len(held):
                    held.append(tok)

    def clear(self) -> None:
        """Forget every cached prefix (busy sequences keep theirs)."""
        with self.lock:
            for key in list(self.cache):
                self.cache.pop(key)
                self._wipe(key)

    def idle(self) -> int:
        """Sequences no row is using (empty or cached)."""
        with self.lock:
            return len(self.free) + len(self.cache)

    # --- inside the lock -----------------------------------------------------------------------
    def _reuse(self, ids: list[int]) -> tuple[int | None, int]:
        key, matched = self.cache.match(ids)
        n = reusable(matched, len(ids))
        if key is None or n == 0:
            return None, 0
        whole = n == len(self.cache.ids(key))
        if not whole and n < COPY_MIN:
            return None, 0
        dst = None if whole else self._empty(exclude=key)
        if dst is None:  # take the entry's sequence over (no other one is free: even a diverging entry)
            self.cache.pop(key)
            dst = key
        else:
            self.memory.seq_cp(key, dst)
            self.cache.touch(key)
        if not self.memory.seq_rm(dst, n, -1):  # a model whose memory can't drop a tail (recurrent)
            self.memory.seq_rm(dst, -1, -1)
            return dst, 0
        return dst, n

    def _empty(self, exclude: int | None = None) -> int | None:
        """An empty sequence, else the least recently used entry's, wiped; None if all are busy."""
        if self.free:
            return self.free.pop(0)
        key = self.cache.oldest(exclude)
        if key is None:
            return None
        self.cache.pop(key)
        self.memory.seq_rm(key, -1, -1)
        return key

    def _wipe(self, seq: int) -> None:
        self.memory.seq_rm(seq, -1, -1)
        if seq not in self.free:
            self.free.append(seq)
