"""Local generation with a transformers model: our own token loop over the KV cache.

A hand-written loop (rather than ``model.generate`` on a helper thread) gives per-token control:
cancellation is checked between tokens, stop strings are matched on the decoded text, text that
might still become a stop string or a tool-call opening is held back, and every token is counted.
Sampling uses transformers' own logits processors, so greedy output equals ``model.generate``'s.
The per-request side (sampling, stop handling, text) is `decoding.Decoding`; this module only runs
the model, for one sequence or for the engine's batch of several (`KVRows`), and keeps finished
sequences' key/values for prompts that start the same way (`KVStore`).
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from chatglm_core.backends.decoding import LocalBackend
from chatglm_core.backends.prefix_cache import PrefixCache, reusable


class TransformersBackend(LocalBackend):
    def __init__(self, model: Any, tokenizer: Any, fmt: Any, *, model_name: str, device: str,
                 context_window: int | None, prefix_cache_mb: int = 512) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.format = fmt
        self.model_name = model_name
        self.device = device
        self.context_window = context_window
        self.kv_store = KVStore(prefix_cache_mb * 2**20) if prefix_cache_mb > 0 else None

    @classmethod
    def from_settings(cls, settings: Any) -> TransformersBackend:
        from chatglm_core.models.loader import load_model

        m = load_model(settings)
        backend = cls(m.model, m.tokenizer, m.format, model_name=m.name, device=m.device,
                      context_window=m.context_window,
                      prefix_cache_mb=settings.prefix_cache_mb if settings.prefix_cache else 0)
        backend.prefill_chunk = settings.prefill_chunk
        return backend

    def clear_prefix_cache(self) -> None:
        """Drop every cached prefix (the next prompts are prefilled whole)."""
        if self.kv_store is not None:
            self.kv_store.clear()

    def open_rows(self, capacity: int) -> KVRows:
        """Up to `capacity` sequences decoded together (the engine's batch, or one for `stream`)."""
        return KVRows(self.model, capacity, self.rows_prefill_chunk(), self.kv_store)


class KVStore:
    """Finished sequences' key/values (one batch row each, without padding), LRU within `max_bytes`.

    A new row starts from a copy of the entry sharing the longest prefix with its prompt; an entry
    wholly continued by the prompt (a chat's next turn) is handed over, since the row will store a
    longer one when it finishes. Tensors stay on the model's device: on a GPU that is where a 6B
    model's long prompts cost (28 KiB a token for ChatGLM3-6B in fp16: 512 MB hold ~18k tokens).
    """

    def __init__(self, max_bytes: int) -> None:
        self.cache = PrefixCache(max_bytes)
        self.lock = threading.Lock()
        self._keys = itertools.count()

    def take(self, ids: list[int]) -> tuple[Any, int]:
        """(a DynamicCache holding the KV of ids' longest cached prefix, its length)."""
        from transformers import DynamicCache

        with self.lock:
            key, matched = self.cache.match(ids)
            n = reusable(matched, len(ids))
            if key is None or n == 0:
                return DynamicCache(), 0
            entry = self.cache.get(key)
            if n == len(entry.ids):
                self.cache.pop(key)
            else:
                self.cache.touch(key)
        # DynamicCache copies what it is given (torch.cat onto an empty tensor): the entry stays intact
        return DynamicCache([(k[:, :, :n], v[:, :, :n]) for k, v in entry.value]), n

    def clear(self) -> None:
        with self.lock:
            self.cache = PrefixCache(self.cache.max_size)

    def put(self, ids: list[int], layers: list[tuple[Any, Any]]) -> None:
        size = sum(k.nbytes + v.nbytes for k, v in layers)
        with self.lock:
            if self.cache.covering(ids) is not None:
                return
            for key in self.cache.prefixes_of(ids):
                self.cache.pop(key)
            self.cache.put(next(self._keys), ids, layers, size)


class KVRows:
    """Sequences in one left-padded batch over a shared DynamicCache.

    A new sequence is prefilled alone (exactly as a single stream would be), then its cache is
    left-padded to the batch's length (or the batch to its) and stacked on. Each step feeds one
    token per row with a 2-D attention mask that hides the padding and per-row position ids, so a
    row's positions and visible keys are those of its own single stream. Finished rows are cut out
    and padding columns no row needs any more are dropped.

    A prompt longer than `prefill_chunk` tokens is prefilled over the following steps, a chunk per
    step after the batch's own forward, so the running rows keep streaming (on 2 cores a 1,582-token
    prompt froze them for 5.8 s); it joins the batch when its last chunk is in.
    """

    def __init__(self, model: Any, capacity: int, prefill_chunk: int | None = None,
                 store: KVStore | None = None) -> None:
        self.model = model
        self.capacity = capacity
        self.prefill_chunk = prefill_chunk
        self.store = store
        self.fed: dict[int, list[int]] = {}  # slot -> the ids whose KV its row holds (prompt, then tokens)
        self.reused: dict[int, int] = {}  # slot -> prompt tokens taken from the store
        self.cache: Any = None
        self.slots: list[int] = []  # batch row -> slot
        self.mask: Any = None  # (rows, kv length) 1 = real token
        self.pos: Any = None  # (rows,) next position of each row
        self.prefilling: dict[int, tuple[list[int], Any, int]] = {}  # slot -> (prompt, its cache, tokens fed)
        self._next_slot = 0

    def add(self, ids: list[int]) -> tuple[int, Any]:
        from transformers import DynamicCache

        if len(self.slots) + len(self.prefilling) >= self.capacity:
            raise RuntimeError("KVRows is full")
        slot = self._next_slot
        self._next_slot += 1
        cache, n = self.store.take(ids) if self.store is not None else (DynamicCache(), 0)
        self.fed[slot], self.reused[slot] = list(ids), n
        if self.prefill_chunk and len(ids) - n > self.prefill_chunk:
            self.prefilling[slot] = (list(ids), cache, n)
            return slot, None
        cache, logits = self._prefill(ids[n:], cache)
        self._join(slot, cache, len(ids))
        return slot, logits

    def cached_tokens(self, slot: int) -> int:
        return self.reused.get(slot, 0)

    def _prefill(self, ids: list[int], cache: Any) -> tuple[Any, Any]:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.model.device), cache=cache, use_cache=True)
        return getattr(out, "cache", None) or out.past_key_values, out.logits[0, -1, :]

    def _join(self, slot: int, cache: Any, n: int) -> None:
        import torch

        mask = torch.ones(1, n, dtype=torch.long, device=self.model.device)
        pos = torch.tensor([n], device=self.model.device)
        with torch.inference_mode():
            if self.cache is None:
                self.cache, self.mask, self.pos = cache, mask, pos
            else:
                self._stack(cache, mask, pos)
        self.slots.append(slot)

    def _stack(self, cache: Any, mask: Any, pos: Any) -> None:
        import torch

        width, n = self.mask.shape[1], mask.shape[1]
        if n < width:
            _left_pad(cache, width - n)
            mask = torch.cat([mask.new_zeros(1, width - n), mask], dim=1)
        elif n > width:
            _left_pad(self.cache, n - width)
            self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], n - width), self.mask], dim=1)
        for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.mask = torch.cat([self.mask, mask], dim=0)
        self.pos = torch.cat([self.pos, pos])

    def step(self, tokens: dict[int, int], pick: Any = None) -> dict[int, Any]:
        out = self._step(tokens)
        return out if pick is None else {s: pick(s, logits) for s, logits in out.items()}

    def _step(self, tokens: dict[int, int]) -> dict[int, Any]:
        import torch

        if set(tokens) != set(self.slots):
            raise RuntimeError("KVRows.step needs one token for every row in the batch")
        out: dict[int, Any] = {}
        if self.slots:
            device = self.model.device
            ids = torch.tensor([[tokens[s]] for s in self.slots], device=device)
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.slots), 1)], dim=1)
            with torch.inference_mode():
                res = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.pos[:, None],
                                 cache=self.cache, use_cache=True)
            self.cache = getattr(res, "cache", None) or res.past_key_values
            self.pos = self.pos + 1
            for s in self.slots:
                self.fed[s].append(tokens[s])
            logits = res.logits[:, -1, :]
            out = {s: logits[i] for i, s in enumerate(self.slots)}
        if self.prefilling:  # the oldest waiting prompt: a chunk beside a running batch, else all of it
            slot = next(iter(self.prefilling))
            ids, cache, fed = self.prefilling[slot]
            n = min(self.prefill_chunk, len(ids) - fed) if self.slots else len(ids) - fed
            cache, logits = self._prefill(ids[fed:fed + n], cache)
            if fed + n < len(ids):
                self.prefilling[slot] = (ids, cache, fed + n)
            else:
                del self.prefilling[slot]
                self._join(slot, cache, len(ids))
                out[slot] = logits
        return out

    def remove(self, slot: int) -> None:
        import torch

        ids = self.fed.pop(slot, [])
        self.reused.pop(slot, None)
        waiting = self.prefilling.pop(slot, None)
        if waiting is not None:  # cancelled mid-prefill: the part it has fed is still worth keeping
            _, cache, fed = waiting
            if fed:
                self._keep(ids[:fed], [(layer.keys, layer.values) for layer in _layers(cache)])
            return
        if slot not in self.slots:
            return
        row = self.slots.index(slot)
        if self.store is not None:
            n = int(self.mask[row].sum())  # rows are right-aligned: its KV is the last n columns
            alone = len(self.slots) == 1 and n == self.mask.shape[1]  # the whole batch: no copy needed

            def own(t: Any) -> Any:
                return t if alone else t[row:row + 1, :, -n:].clone()

            self._keep(ids, [(own(layer.keys), own(layer.values)) for layer in _layers(self.cache)])
        keep = [i for i, s in enumerate(self.slots) if s != slot]
        self.slots = [self.slots[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.pos = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask, self.pos = self.mask[index], self.pos[index]
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0  # leading columns that are padding in every row
        self.mask = self.mask[:, first:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys[index, :, first:, :]
            layer.values = layer.values[index, :, first:, :]

    def _keep(self, ids: list[int], layers: list[tuple[Any, Any]]) -> None:
        if self.store is not None and ids and layers and layers[0][0].shape[2] == len(ids):
            self.store.put(ids, layers)


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        raise RuntimeError(f"batching needs a plain DynamicCache, got {type(cache).__name__}")
    return layers


def _left_pad(cache: Any, n: int) -> None:
    import torch

    for layer in _layers(cache):
        b, h, _, d = layer.keys.shape
        layer.keys = torch.cat([layer.keys.new_zeros(b, h, n, d), layer.keys], dim=2)
        layer.values = torch.cat([layer.values.new_zeros(b, h, n, layer.values.shape[-1]), layer.values], dim=2)
