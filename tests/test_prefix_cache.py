"""The prefix cache's bookkeeping (`backends.prefix_cache`) and llama.cpp's sequence pool
(`backends.llamacpp_cache`) against a recording stand-in for llama.cpp's memory calls: which entry a
prompt starts from, when it is taken over or copied, and what is evicted. The real models'
cached-vs-cold replies are tested in test_llamacpp.py and test_engine.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from chatglm_core.backends.llamacpp_cache import COPY_MIN, SequencePool
from chatglm_core.backends.prefix_cache import PrefixCache, common_prefix, reusable


@pytest.mark.parametrize(("a", "b", "n"), [
    ([], [1, 2], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2), ([1, 2, 3], [1, 5, 3], 1), ([7], [1], 0),
])
def test_common_prefix(a, b, n):
    assert common_prefix(np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)) == n


@pytest.mark.parametrize(("matched", "prompt_len", "n"), [(0, 5, 0), (3, 5, 3), (5, 5, 4), (9, 5, 4), (1, 1, 0)])
def test_a_row_always_feeds_its_last_prompt_token(matched, prompt_len, n):
    assert reusable(matched, prompt_len) == n


def test_match_prefers_the_longest_then_the_most_recent():
    cache = PrefixCache()
    cache.put("a", [1, 2, 3, 4])
    cache.put("b", [1, 2, 9])
    cache.put("c", [1, 2, 3, 7])
    assert cache.match([1, 2, 3, 4, 5]) == ("a", 4)
    assert cache.match([1, 2, 3, 8]) == ("c", 3)  # a and c share 3: c was used last
    cache.touch("a")
    assert cache.match([1, 2, 3, 8]) == ("a", 3)
    assert cache.match([5, 1]) == (None, 0)
    assert cache.covering([1, 2]) == "a" and cache.covering([1, 2, 9, 9]) is None  # a: the most recent
    assert sorted(cache.prefixes_of([1, 2, 9, 4])) == ["b"]


def test_a_byte_budget_evicts_the_least_recently_used():
    cache = PrefixCache(max_size=100)
    assert cache.put("a", [1], size=40) == [] and cache.put("b", [2], size=40) == []
    cache.touch("a")
    evicted = cache.put("c", [3], size=40)
    assert [e.ids.tolist() for e in evicted] == [[2]] and list(cache) == ["a", "c"] and cache.size == 80
    too_big = cache.put("d", [4], size=101)
    assert [e.ids.tolist() for e in too_big] == [[4]] and "d" not in cache and cache.size == 80


class Memory:
    """Records llama.cpp memory calls; `tail_ok=False` plays a model that can't drop a tail."""

    def __init__(self, tail_ok: bool = True) -> None:
        self.calls: list[tuple] = []
        self.tail_ok = tail_ok

    def seq_rm(self, seq, p0, p1):
        self.calls.append(("rm", seq, p0, p1))
        return self.tail_ok or p0 < 0

    def seq_cp(self, src, dst):
        self.calls.append(("cp", src, dst))


def pool(n=3, **kw) -> tuple[SequencePool, Memory]:
    memory = Memory(**kw)
    return SequencePool(n, memory, threading.RLock()), memory


def finish(p: SequencePool, ids: list[int]) -> int:
    """A row that fed `ids` and finished: its sequence becomes a cache entry."""
    seq, reused = p.acquire(ids)
    p.fed([(t, i, seq, False) for i, t in enumerate(ids) if i >= reused])
    p.release(seq)
    return seq


def test_the_next_turn_takes_its_conversations_sequence_over():
    p, memory = pool()
    turn1 = list(range(100, 180))
    seq = finish(p, turn1)
    assert p.cache.ids(seq).tolist() == turn1 and p.idle() == 3
    memory.calls.clear()
    got, reused = p.acquire(turn1 + [5, 6, 7])
    assert (got, reused) == (seq, 80) and memory.calls == [("rm", seq, 80, -1)]
    assert seq not in p.cache and p.tokens[seq] == turn1


def test_the_same_prompt_again_feeds_its_last_token_and_keeps_the_old_reply():
    p, memory = pool()
    prompt = list(range(200))
    seq = finish(p, prompt + [1, 2, 3])  # the prompt and its reply
    memory.calls.clear()
    got, reused = p.acquire(prompt)  # e.g. regenerate
    assert reused == len(prompt) - 1 and got != seq and seq in p.cache
    assert memory.calls == [("cp", seq, got), ("rm", got, len(prompt) - 1, -1)]


def test_a_short_shared_start_is_not_worth_a_copy():
    p, memory = pool()
    seq = finish(p, list(range(COPY_MIN + 10)))
    memory.calls.clear()
    got, reused = p.acquire(list(range(COPY_MIN - 1)) + [999, 998])
    assert reused == 0 and got != seq and memory.calls == [] and seq in p.cache


def test_eviction_takes_the_least_recently_used_entry():
    p, memory = pool(n=2)
    a = finish(p, [1] * 100)
    b = finish(p, [2] * 100)
    assert p.acquire([1] * 100 + [3]) == (a, 100)  # a's conversation goes on: a is busy
    assert finish(p, [4] * 10) == b  # needs a sequence: b's entry, the only idle one, is evicted
    assert list(p.cache) == [b] and p.cache.ids(b).tolist() == [4] * 10 and ("rm", b, -1, -1) in memory.calls
    assert p.acquire([9]) == (b, 0)
    with pytest.raises(RuntimeError, match="in use"):
        p.acquire([8])


def test_a_diverging_entry_is_taken_over_when_no_other_sequence_is_free():
    p, memory = pool(n=2)
    busy, _ = p.acquire([7] * 5)
    seq = finish(p, list(range(150)))
    got, reused = p.acquire(list(range(100)) + [999])
    assert (got, reused) == (seq, 100) and seq not in p.cache and busy in p.busy


def test_memory_that_cannot_drop_a_tail_starts_cold():
    p, memory = pool(tail_ok=False)
    seq = finish(p, list(range(50)))
    got, reused = p.acquire(list(range(60)))
    assert (got, reused) == (seq, 0) and p.tokens[got] == [] and got not in p.free and memory.calls[-1] == (
        "rm", seq, -1, -1)


def test_redundant_entries_are_not_kept():
    p, memory = pool()
    short = finish(p, list(range(50)))
    longer, _ = p.acquire(list(range(80)), reuse=False)  # e.g. started cold while short was busy
    p.fed([(t, t, longer, False) for t in range(80)])
    p.release(longer)  # it holds all of short: short's sequence is wiped and freed
    assert list(p.cache) == [longer] and short in p.free
    seq, _ = p.acquire([99] * 10)
    p.fed([(99, i, seq, False) for i in range(10)])
    again, reused = p.acquire(list(range(70)))  # copied from longer, which holds all of it
    p.release(again)  # nothing new to keep: wiped
    assert list(p.cache) == [longer] and again in p.free and reused == 69


def test_no_cache_when_turned_off_and_for_scoring():
    p, memory = pool()
    p.caching = False
    seq = finish(p, list(range(50)))
    assert len(p.cache) == 0 and seq in p.free
    p.caching = True
    finish(p, list(range(50)))
    assert p.acquire(list(range(60)), reuse=False)[1] == 0
