"""GGUF models on llama.cpp (``llama-cpp-python``): the fast CPU path, and the default for GGUF
models (the embedded one included) when llama-cpp-python is installed and no GPU is used.

Only the forward pass runs in llama.cpp. The prompt is rendered by the same injection-safe chat
template format as the transformers path, with the GGUF's own tokenizer (read by transformers, so
token ids match llama.cpp's vocabulary), and sampling, penalties, constraints, stop handling and
cancellation are the shared `decoding.Decoding`: a request gives the same prompt ids and samples
the same way on either backend.

Several sequences decode together in one llama.cpp context (one sequence id and its own KV cells
per row), which is how the engine batches concurrent callers. A finished row's sequence keeps its KV
as a prompt cache entry: the next prompt that starts with the same tokens (a chat's next turn) only
feeds the rest (`llamacpp_cache.SequencePool`).

What llama.cpp computes with (`Settings.gguf_weights`): a quantized GGUF's own weights run with
quantized activations too (llama.cpp rounds each activation row to 8 bits for its integer dot
products), which moves a small model's answers: on the embedded SmolLM2 (Q4_1) its greedy
next token differs from the dequantized reference's at 3.4 % of positions and "What is the
capital of France?" loses "Paris". So by default ("auto") a small model's weights are converted
once to float16 with llama.cpp's own `llama_model_quantize` (cached beside the other converted
weights; under a second): llama.cpp then picks the reference's token at every position we checked,
a batched row equals its single stream, and it still decodes ~3.5x faster than transformers here.
"bfloat16" is a little faster under load (bf16 dot products) but agrees at 99.8 % and a batched
row can differ from its single stream; "native" is fastest for one stream (the Q4_1 file itself).
Models of AUTO_CONVERT_MAX_PARAMS parameters or more run natively under "auto": their decoding is
bound by memory bandwidth, which quantized weights save.

llama-cpp-python is installed by `make setup` (`requirements-llamacpp.txt`); it builds llama.cpp
from source with ``-march=native`` for the machine it is installed on. Without it, GGUF models run
on the transformers backend (dequantized to float32, several times slower).
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import logging
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from chatglm_core.backends.decoding import LocalBackend
from chatglm_core.backends.llamacpp_cache import SequencePool
from chatglm_core.errors import ConfigError, GenerationError, RequestError
from chatglm_core.models.loader import cpu_count, cpu_threads, default_threads

log = logging.getLogger(__name__)

#: Context per row (tokens) when the model's training context is larger; the KV cache holds
#: DEFAULT_N_CTX x DEFAULT_SEQUENCES tokens (720 MiB for SmolLM2-135M in f16).
DEFAULT_N_CTX = 4096
#: Rows one context can hold: the engine's default batch.
DEFAULT_SEQUENCES = 8
#: "auto" converts GGUF models below this many parameters to float16 (the embedded one has 135 M).
AUTO_CONVERT_MAX_PARAMS = 1_000_000_000
#: GGUF general.file_type values of unquantized files (nothing to convert).
_UNQUANTIZED = {0: "float32", 1: "float16", 32: "bfloat16"}


def available() -> bool:
    """Whether llama-cpp-python is installed (without importing it: the import loads a native library)."""
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_path(settings: Any) -> Path | None:
    """The GGUF file the settings point at (the embedded default when MODEL_PATH is unset), else None."""
    from chatglm_core.models.loader import embedded_gguf

    if settings.model_path is None:
        return embedded_gguf()
    p = Path(settings.model_path).expanduser()
    return p if p.is_file() and p.suffix.lower() == ".gguf" else None


class LlamaCppBackend(LocalBackend):
    device = "cpu"
    runtime = "llama.cpp"  # what computes: shown beside the device

    def __init__(self, gguf: Path, tokenizer: Any, fmt: Any, *, model_name: str, n_ctx: int | None = None,
                 n_threads: int | None = None, n_threads_batch: int | None = None, sequences: int = DEFAULT_SEQUENCES,
                 flash_attn: bool | None = None, extra_buffers: bool | None = None, prefix_cache: bool = True,
                 load: str = "mmap", huge_pages: bool = False) -> None:
        import llama_cpp

        _quiet_native_logs()
        self.tokenizer, self.format, self.model_name = tokenizer, fmt, model_name
        self.gguf = self.source_gguf = gguf  # the file computed with; the one the settings named
        self._ll = llama_cpp
        self.extra_buffers = use_extra_buffers("auto") if extra_buffers is None else extra_buffers
        self.load = load  # "read" or "mmap": how the weights are held (load_mode)
        self._model, self.huge_page_bytes = load_weights(gguf, self.extra_buffers, load, huge_pages)
        train_ctx = llama_cpp.llama_model_n_ctx_train(self._model)
        self.context_window = n_ctx or min(train_ctx, DEFAULT_N_CTX)  # per row
        self.n_ctx = self.context_window * sequences
        self.n_batch = min(512, self.context_window)
        # the physical cores by default, for one-token steps as for prompts and batches (models.loader.default_threads)
        threads = n_threads or default_threads()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = self.n_ctx, self.n_batch, self.n_batch
        cparams.n_seq_max = sequences
        # Each row gets its own KV cells: attention then sees exactly a single stream's keys, so a
        # batched row's greedy output equals its single-stream one (a unified cache does not).
        cparams.kv_unified = False
        cparams.n_threads, cparams.n_threads_batch = threads, n_threads_batch or threads
        # Flash attention as llama.cpp and llama-server default to ("auto": on where the CPU backend
        # supports the model's attention). Measured here on a 1,431-token prompt at 2 threads: prefill
        # 3.0 s with it, 3.4-4.0 s without (the unfused path also slows as other sequences fill the
        # context); decoding at 1.5k tokens of context 71 vs 63 tok/s; only a short prompt after a long
        # cached one (a next turn's ~20 tokens) is slower, 127 vs 89 ms. None: auto; True/False: force.
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ConfigError(f"llama.cpp could not create a context of {self.n_ctx} tokens for {gguf}: lower n_ctx")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self._row_type = ctypes.c_float * self.n_vocab  # one row of logits, read in place
        # llama_get_logits_ith answering a plain address (llama-cpp-python's binding makes a ctypes
        # pointer object, which then had to be cast)
        self._logits_addr = llama_cpp.llama_cpp._lib["llama_get_logits_ith"]
        self._logits_addr.argtypes, self._logits_addr.restype = [ctypes.c_void_p, ctypes.c_int32], ctypes.c_void_p
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._use = threading.RLock()  # held while llama.cpp runs, so close() never frees under it
        _open_backends.add(self)
        self.sequences = sequences
        self.seqs = SequencePool(sequences, self, self._use, cache=prefix_cache)
        self.n_threads = threads

    @classmethod
    def from_settings(cls, settings: Any) -> LlamaCppBackend:
        from chatglm_core.models.loader import EMBEDDED_NAME

        if not available():
            raise ConfigError("backend=llamacpp needs llama-cpp-python: `pip install -r requirements-llamacpp.txt` "
                              "(builds llama.cpp, a few minutes), or set CHATGLM_BACKEND=transformers")
        gguf = gguf_path(settings)
        if gguf is None:
            raise ConfigError(f"backend=llamacpp runs .gguf files; MODEL_PATH={settings.model_path!r} is not one: "
                              "point it at a .gguf file or set CHATGLM_BACKEND=transformers")
        if settings.device not in ("auto", "cpu"):
            raise ConfigError(f"backend=llamacpp runs on the CPU here; device={settings.device} needs "
                              "CHATGLM_BACKEND=transformers")
        tokenizer = gguf_tokenizer(gguf, settings)
        fmt = _format(gguf, tokenizer)
        name = EMBEDDED_NAME if settings.model_path is None else gguf.stem
        threads = cpu_threads(settings)
        computed = compute_file(gguf, settings)
        backend = cls(computed, tokenizer, fmt, model_name=name, n_threads=threads,
                      n_threads_batch=threads, extra_buffers=use_extra_buffers(settings.llama_repack),
                      flash_attn={"auto": None, "on": True, "off": False}[settings.llama_flash_attn],
                      prefix_cache=settings.prefix_cache, load=load_mode(settings.llama_load, computed),
                      huge_pages=settings.llama_hugepages == "auto")
        backend.source_gguf = gguf
        backend.prefill_chunk = settings.prefill_chunk
        if backend.gguf != gguf:
            backend.runtime = f"llama.cpp, {backend.gguf.stem.rsplit('-', 1)[-1]} copy of the GGUF"
        return backend

    def clear_prefix_cache(self) -> None:
        """Drop every cached prefix (the next prompts are prefilled whole)."""
        self.seqs.clear()

    def open_rows(self, capacity: int) -> LlamaRows:
        return LlamaRows(self, capacity, self.rows_prefill_chunk())

    def close(self) -> None:
        """Free the model and context (waits for a decode in flight); later requests fail cleanly."""
        ll = self._ll
        with self._use:
            if getattr(self, "_ctx", None):
                ll.llama_batch_free(self._batch)
                ll.llama_free(self._ctx)
                ll.llama_model_free(self._model)
                self._ctx = self._model = self._memory = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down ctypes already
            pass

    # --- the context, used by LlamaRows and SequencePool -----------------------------------
    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        with self._use:
            return self._memory is None or bool(self._ll.llama_memory_seq_rm(self._memory, seq, p0, p1))

    def seq_cp(self, src: int, dst: int) -> None:
        with self._use:
            if self._memory is not None:
                self._ll.llama_memory_seq_cp(self._memory, src, dst, -1, -1)

    def teacher_forced_logits(self, ids: list[int], start: int) -> list[Any]:
        """Next-token logits after each of ids[start:], with ids fed as given (scoring a known text
        against another model's choices, as the tests and benchmarks/bench_gguf_weights.py do).
        Always from position 0: no cached prefix is used or kept."""
        import torch

        seq, _ = self.seqs.acquire(ids, reuse=False)
        try:
            return [torch.from_numpy(row) for row in self.run([(t, p, seq, p >= start) for p, t in enumerate(ids)])]
        finally:
            self.seqs.release(seq, keep=False)

    def run(self, items: list[tuple[int, int, int, bool]], pick: Any = None) -> list[Any]:
        """Decode (token, position, sequence, wants logits) items; logits (1-D float32 numpy arrays) of
        those asking, in the items' order.

        With `pick`, each of those is `pick(index of the item, logits)` instead, called while the
        logits are llama.cpp's own buffer (no copy: ~50 us a row right after a decode), which it may
        change in place and must not keep: the next decode overwrites it."""
        with self._use:
            if self._ctx is None:
                raise GenerationError("the llama.cpp backend is closed (the process is shutting down?)")
            return self._run(items, pick)

    def _run(self, items: list[tuple[int, int, int, bool]], pick: Any = None) -> list[Any]:
        ll, b = self._ll, self._batch
        # Sequences in increasing order: with a stream per sequence (kv_unified=False) llama.cpp cuts a
        # batch into a micro-batch wherever the sequence id goes down, so 8 rows in the engine's order
        # (arrivals, not sequence ids) took 1.3x (one out of place) to 3x (reversed) the time of the same
        # step in order (measured here: 29.7, 39.8 and 88.6 ms).
        order = sorted(range(len(items)), key=lambda i: (items[i][2], items[i][1]))
        got: list[tuple[int, Any]] = []  # (index in items, logits)
        for start in range(0, len(order), self.n_batch):
            chunk = [items[i] for i in order[start:start + self.n_batch]]
            for i, (tok, pos, seq, logits) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
                b.seq_id[i][0] = seq
                b.logits[i] = logits
            b.n_tokens = len(chunk)
            rc = ll.llama_decode(self._ctx, b)
            if rc == 1:
                raise GenerationError(f"llama.cpp's KV cache ({self.context_window} tokens per request) is full: "
                                      "shorten the conversation or lower max_new_tokens")
            if rc != 0:
                raise GenerationError(f"llama.cpp failed to decode (code {rc})")
            self.seqs.fed(chunk)
            for i, (_, _, _, logits) in enumerate(chunk):
                if logits:  # picked or copied now: the next decode overwrites llama.cpp's buffer
                    index, row = order[start + i], self._logits_row(i)
                    got.append((index, row.copy() if pick is None else pick(index, row)))
        got.sort(key=lambda g: g[0])
        return [row for _, row in got]

    def _logits_row(self, i: int) -> Any:
        """A numpy view of llama.cpp's logits for batch item i (valid until the next decode)."""
        addr = self._logits_addr(self._ctx, i)
        if not addr:  # llama.cpp logged why (an index it has no output for)
            raise GenerationError(f"llama.cpp returned no logits for batch item {i}")
        return np.frombuffer(self._row_type.from_address(addr), dtype=np.float32)


class LlamaRows:
    """Rows as llama.cpp sequences. A prompt up to `prefill_chunk` tokens is prefilled by `add` at
    once (simultaneous arrivals then get their first tokens one after another, the soonest on
    average). A longer one is fed by the following steps, up to `prefill_chunk` tokens a step in the
    same llama_decode as the running rows' tokens: it slows the other streams for a few steps instead
    of freezing them for its whole prefill (a 1,582-token prompt stopped them for 3.7 s on 2 cores).
    With no row running, a step feeds a whole `n_batch`. A prompt whose start is cached
    (`SequencePool.acquire`) begins at the first token not cached, and only the rest counts here.
    """

    def __init__(self, backend: LlamaCppBackend, capacity: int, prefill_chunk: int) -> None:
        self.backend = backend
        self.capacity = min(capacity, backend.sequences)
        self.prefill_chunk = max(1, prefill_chunk)
        self.seqs: dict[int, int] = {}  # slot -> llama.cpp sequence id
        self.pos: dict[int, int] = {}  # slot -> next position
        self.prompts: dict[int, list[int]] = {}  # slot -> its prompt, while not all of it is fed (FIFO)
        self.reused: dict[int, int] = {}  # slot -> prompt tokens its sequence had cached
        self._next_slot = 0

    def add(self, ids: list[int]) -> tuple[int, Any]:
        if len(self.seqs) >= self.capacity:
            raise RuntimeError("LlamaRows is full")
        if not ids:
            raise RequestError("the prompt is empty", param="messages")
        seq, reused = self.backend.seqs.acquire(ids)
        logits = None
        if len(ids) - reused <= self.prefill_chunk:
            try:
                (logits,) = self.backend.run(_prompt_items(ids, seq, reused, len(ids)))
            except BaseException:
                self.backend.seqs.release(seq)
                raise
        slot = self._next_slot
        self._next_slot += 1
        self.seqs[slot], self.pos[slot] = seq, len(ids) if logits is not None else reused
        self.reused[slot] = reused
        if logits is None:
            self.prompts[slot] = list(ids)
        return slot, logits

    def cached_tokens(self, slot: int) -> int:
        return self.reused.get(slot, 0)

    def step(self, tokens: dict[int, int], pick: Any = None) -> dict[int, Any]:
        decoding = list(tokens)
        items = [(tokens[s], self.pos[s], self.seqs[s], True) for s in decoding]
        budget = self.prefill_chunk if decoding else self.backend.n_batch
        fed: dict[int, int] = {}
        for s, ids in self.prompts.items():  # oldest first; one prompt finishes per step at most
            start = self.pos[s]
            n = min(budget, len(ids) - start)
            items += _prompt_items(ids, self.seqs[s], start, start + n)
            fed[s], budget = n, budget - n
            if budget <= 0 or start + n == len(ids):
                break
        by_item = None
        if pick is not None:  # items asking for logits: one per decoding slot, then a prompt's last token
            slot_of = dict(enumerate(decoding))
            ends = [s for s, n in fed.items() if self.pos[s] + n == len(self.prompts[s])]
            if ends:  # at most one, the last fed (the loop above stops there)
                slot_of[len(items) - 1] = ends[0]

            def by_item(index: int, logits: Any) -> Any:
                return pick(slot_of[index], logits)
        logits = self.backend.run(items, by_item) if items else []
        for s in decoding:
            self.pos[s] += 1
        finished = []
        for s, n in fed.items():
            self.pos[s] += n
            if self.pos[s] == len(self.prompts[s]):
                finished.append(s)
                del self.prompts[s]
        return dict(zip(decoding + finished, logits, strict=True))

    def remove(self, slot: int) -> None:
        seq = self.seqs.pop(slot, None)
        self.pos.pop(slot, None)
        self.prompts.pop(slot, None)
        self.reused.pop(slot, None)
        if seq is not None:
            self.backend.seqs.release(seq)


def _prompt_items(ids: list[int], seq: int, start: int, stop: int) -> list[tuple[int, int, int, bool]]:
    """`run` items feeding ids[start:stop] to sequence `seq`; logits for the prompt's last token only."""
    return [(ids[p], p, seq, p == len(ids) - 1) for p in range(start, stop)]


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags /proc/cpuinfo reports (an empty set where there is none to read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def use_extra_buffers(mode: str, flags: set[str] | None = None) -> bool:
    """Whether llama.cpp may put weights in its "extra" buffer types (`Settings.llama_repack`).

    Those are the weights llama.cpp repacks at load for faster kernels: its AMX buffers on Intel
    CPUs with AMX (Sapphire Rapids and newer) and its CPU_REPACK buffers (Q4_0, Q4_K, IQ4_NL, ... on
    AVX2). On AMX CPUs the AMX path segfaults in llama_decode on quantized weights
    (ggml_backend_amx_mul_mat; upstream ggml-org/llama.cpp #20824, no fix), taking the whole process
    down: the app with every user's session. So "auto" turns them off there, like llama-server's
    --no-repack, and keeps them elsewhere, where the repacked Q4_0/Q4_K_M kernels decode faster (the
    README's figures). The float16/bfloat16 copies have no extra-buffer path either way."""
    if mode in ("on", "off"):
        return mode == "on"
    flags = cpu_flags() if flags is None else flags
    return not any(f.startswith("amx") for f in flags)


def load_mode(mode: str, gguf: Path, available: int | None = None) -> str:
    """"read" or "mmap" for Settings.llama_load on this file.

    Weights read into the process's memory decoded faster than the same file mapped (llama.cpp's and
    llama-server's default): the embedded SmolLM2 at 2 threads here, one stream through the API
    1.055-1.086x (two of our servers, interleaved), a token in one process 9.3-9.6 against 9.7-10.8 ms
    (benchmarks/bench_vs_llama_server.py shows it against llama-server's both ways). A mapped file is
    shared by processes and paged in and out by the system, which a file near the size of the memory
    needs, so "auto" reads a file that fits in half the memory available and maps a bigger one (or
    when the available memory is unknown)."""
    if mode != "auto":
        return mode
    available = _available_memory() if available is None else available
    try:
        size = gguf.stat().st_size
    except OSError:
        return "mmap"
    return "read" if available and size <= available // 2 else "mmap"


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # Linux's madvise advice values
HUGE_PAGE = 2 << 20


def anon_regions() -> set[tuple[int, int]]:
    """(start, end) of this process's anonymous read-write mappings of a huge page or more (Linux)."""
    regions = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) == 5 and fields[1] == "rw-p":  # no path: anonymous
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    if end - start >= HUGE_PAGE:
                        regions.add((start, end))
    except (OSError, ValueError):
        pass
    return regions


def use_huge_pages(regions: set[tuple[int, int]]) -> int:
    """Back `regions` (the memory llama.cpp allocated while loading, the weights read into it) with
    transparent huge pages now (MADV_COLLAPSE, Linux 6.1+), and ask for them if it is ever paged in
    again (MADV_HUGEPAGE); bytes now in huge pages, 0 where the kernel says no (THP "never", an older
    kernel, not Linux).

    Why by hand: llama.cpp allocates its CPU buffers with plain malloc, which gets 4 KiB pages unless
    the system's THP setting is "always" (this machine's is "madvise", a common default). With 2 MiB
    pages the same weights decoded faster here (one stream through the API 1.037x, a token in one
    process 9.43 against 9.56 ms; a prefill moved within the noise): fewer TLB misses while streaming
    hundreds of megabytes a token, which costs most in a VM (two-level page walks)."""
    if sys.platform != "linux" or not regions:
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    done = 0
    for start, end in sorted(regions):
        if madvise(start, end - start, MADV_HUGEPAGE) != 0:
            continue  # THP "never" or not built in (then every region is refused), or this region alone
        first = (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        # chunk by chunk: a refused chunk (not all of it mapped yet, say) leaves the others; a kernel
        # without MADV_COLLAPSE refuses them all (EINVAL), which costs microseconds
        done += HUGE_PAGE * sum(madvise(chunk, HUGE_PAGE, MADV_COLLAPSE) == 0
                                for chunk in range(first, end - HUGE_PAGE + 1, HUGE_PAGE))
    return done


def load_weights(gguf: Path, extra_buffers: bool, mode: str, huge_pages: bool) -> tuple[Any, int]:
    """(the llama.cpp model, bytes of it on huge pages): the file loaded as `mode` says, and with
    `huge_pages` the weights of a "read" load collapsed onto huge pages (the memory mapped while
    loading; not the KV cache, made later: a step reads all of the weights and little of the cache,
    and collapsing it too took ~0.7 s more). Our backend and bench_decode_overhead's raw loop hold
    their weights alike through this."""
    collapse = huge_pages and mode == "read"
    before = anon_regions() if collapse else set()
    model = _load_model(gguf, extra_buffers, mode)
    moved = use_huge_pages(anon_regions() - before) if collapse else 0
    if moved:
        log.info("llama.cpp: %d MiB of weights on huge pages", moved >> 20)
    return model, moved


def _load_model(gguf: Path, extra_buffers: bool, mode: str = "mmap") -> Any:
    import llama_cpp as ll

    ll.llama_backend_init()
    params = ll.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_extra_bufts = extra_buffers
    if hasattr(params, "load_mode"):  # llama.cpp's llama_load_mode (llama-cpp-python 0.3.36)
        params.load_mode = ll.LLAMA_LOAD_MODE_MMAP if mode == "mmap" else ll.LLAMA_LOAD_MODE_NONE
    else:  # the older use_mmap flag
        params.use_mmap = mode == "mmap"
    model = ll.llama_model_load_from_file(str(gguf).encode(), params)
    if not model:
        raise ConfigError(f"llama.cpp could not load {gguf}: is it a valid GGUF file of a supported architecture?")
    return model


def compute_file(gguf: Path, settings: Any) -> Path:
    """The GGUF file llama.cpp should compute with for `settings.gguf_weights` (module docstring):
    `gguf` itself, or its weights converted once to bfloat16/float16 and cached."""
    mode = settings.gguf_weights
    if mode == "native":
        return gguf
    wanted = "float16" if mode == "auto" else mode
    target = _converted_path(gguf, settings, wanted)
    if target.is_file():
        return target
    n_params, file_type = _inspect(gguf)
    if file_type in _UNQUANTIZED:  # already unquantized: converting changes nothing that matters
        return gguf
    if mode == "auto" and n_params >= AUTO_CONVERT_MAX_PARAMS:
        return gguf
    try:
        _convert(gguf, target, wanted)
    except (ConfigError, OSError) as e:
        if mode != "auto":
            raise ConfigError(f"could not convert {gguf} to {wanted} for llama.cpp: {e}") from e
        log.warning("running %s with its own quantized weights: %s", gguf.name, e)  # e.g. a read-only cache
        return gguf
    return target


def _converted_path(gguf: Path, settings: Any, mode: str) -> Path:
    from chatglm_core.models.loader import gguf_cache_dir

    folder = gguf_cache_dir(gguf, settings)
    return folder.with_name(f"{folder.name}-{mode}.gguf")


def _inspect(gguf: Path) -> tuple[int, int | None]:
    """(parameter count, general.file_type) of a GGUF, from llama.cpp with the file memory-mapped."""
    import llama_cpp as ll

    _quiet_native_logs()
    model = _load_model(gguf, extra_buffers=False)  # nothing is computed: repacking would be wasted work
    try:
        buf = ctypes.create_string_buffer(32)
        n = ll.llama_model_meta_val_str(model, b"general.file_type", buf, len(buf))
        file_type = int(buf.value) if n > 0 and buf.value.isdigit() else None
        return int(ll.llama_model_n_params(model)), file_type
    finally:
        ll.llama_model_free(model)


def _convert(gguf: Path, target: Path, mode: str) -> None:
    """Write `gguf` with its weights as `mode` (llama.cpp's quantize tool, dequantizing on the way)."""
    import llama_cpp as ll

    log.info("converting %s to %s once for llama.cpp (cached at %s)", gguf, mode, target)
    _quiet_native_logs()
    params = ll.llama_model_quantize_default_params()
    params.ftype = ll.LLAMA_FTYPE_MOSTLY_BF16 if mode == "bfloat16" else ll.LLAMA_FTYPE_MOSTLY_F16
    params.allow_requantize = True
    params.nthread = cpu_count()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        rc = ll.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ConfigError(f"llama.cpp could not convert {gguf} to {mode} (code {rc}): "
                              "set CHATGLM_GGUF_WEIGHTS=native to run its own weights")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def gguf_tokenizer(gguf: Path, settings: Any) -> Any:
    """The GGUF's tokenizer via transformers, cached beside the converted weights (no dequantizing),
    splitting text as llama.cpp does (`models.gguf_split`)."""
    from transformers import AutoTokenizer

    from chatglm_core.models import gguf_split
    from chatglm_core.models.loader import gguf_cache_dir

    converted = gguf_cache_dir(gguf, settings)
    if (converted / "tokenizer_config.json").is_file():
        return gguf_split.load(converted, gguf)
    folder = converted.with_name(converted.name + "-tokenizer")
    if not (folder / "tokenizer_config.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:  # transformers raises many types for an unsupported tokenizer
            raise ConfigError(f"could not read the tokenizer of {gguf}: {e}") from e
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tok.save_pretrained(tmp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not folder.exists():
            tmp.rename(folder)
    return gguf_split.load(folder, gguf)


def _format(gguf: Path, tokenizer: Any) -> Any:
    from chatglm_core.formats.hf_template import HFTemplateFormat

    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{gguf} is not a chat model: its tokenizer has no chat template. Use an instruct/chat model")
    return HFTemplateFormat(tokenizer)


_log_callback: Any = None
_open_backends: weakref.WeakSet[LlamaCppBackend] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Free llama.cpp before the interpreter and the C++ runtime are torn down: an engine's worker
    thread (a daemon) may still be decoding, and native teardown under it aborts the process."""
    for backend in list(_open_backends):
        backend.close()


def _quiet_native_logs() -> None:
    """Route llama.cpp's native log lines to Python logging (debug) instead of stderr."""
    global _log_callback
    import llama_cpp

    if _log_callback is None:
        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
                log.warning("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

        _log_callback = callback  # keep it alive: llama.cpp holds the pointer
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
