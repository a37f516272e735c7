"""Per-token overhead and prefill: our engine vs llama.cpp's own loop, same file, same threads.

    python benchmarks/bench_decode_overhead.py [--threads 1,2] [--tokens 128] [--runs 5] [--prompt 1500]

The anchor is llama-cpp-python's low-level loop on the same float16 GGUF (an in-process stand-in
for llama-bench's tg figure): one sequence, `llama_decode` of one token, llama.cpp's own greedy
sampler in C, nothing else, with the weights held as our backend holds them (`CHATGLM_LLAMA_LOAD`,
`CHATGLM_LLAMA_HUGEPAGES`).
Ours is `Engine.stream` (greedy) on the llama.cpp backend: sampling on llama.cpp's logits, stop
handling, detokenising, the hand-off to the caller's thread. Both decode after the same prompt;
the two alternate, medians of tokens/s after the first token.
Prefill: the first token of a ~1.5k-token prompt from an empty cache through the engine vs the raw
loop's `llama_decode` of the same ids in llama-server's default batches (2,048, micro-batches of 512).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatglm_core.backends.base import GenerationOptions  # noqa: E402
from chatglm_core.engine import Engine  # noqa: E402
from chatglm_core.messages import Message, Role  # noqa: E402
from chatglm_core.settings import load_settings  # noqa: E402

from bench_perf import off_main  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

STORY = [Message(Role.USER, "Write a long story about a lighthouse keeper and a storm.")]


class RawLoop:
    """llama.cpp's decode loop through llama-cpp-python's C API, nothing of ours in it."""

    def __init__(self, backend: Any, threads: int) -> None:
        import llama_cpp as ll

        from chatglm_core.backends.llamacpp import load_weights

        self.ll = ll
        # the weights held as our backend holds them (CHATGLM_LLAMA_LOAD, CHATGLM_LLAMA_HUGEPAGES): read
        # weights on huge pages decode faster here, and this measures our per-token work, not the pages
        self.model, _ = load_weights(backend.gguf, backend.extra_buffers, backend.load, backend.huge_page_bytes > 0)
        cparams = ll.llama_context_default_params()
        cparams.n_ctx, cparams.n_threads, cparams.n_threads_batch = 4096, threads, threads
        self.n_batch = cparams.n_batch = 2048
        cparams.n_ubatch = 512
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        self.sampler = ll.llama_sampler_init_greedy()
        self.batch = ll.llama_batch_init(2048, 0, 1)

    def _decode(self, tokens: list[int], start: int) -> None:
        b = self.batch
        for i, tok in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = tok, start + i, 1, 0
            b.logits[i] = i == len(tokens) - 1
        b.n_tokens = len(tokens)
        if self.ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    @off_main
    def rate(self, prompt: list[int], n: int) -> float:
        ll = self.ll
        ll.llama_memory_seq_rm(ll.llama_get_memory(self.ctx), 0, -1, -1)
        self._decode(prompt, 0)
        tok = ll.llama_sampler_sample(self.sampler, self.ctx, -1)
        start = time.perf_counter()
        for i in range(n - 1):
            self._decode([tok], len(prompt) + i)
            tok = ll.llama_sampler_sample(self.sampler, self.ctx, -1)
        return (n - 1) / (time.perf_counter() - start)

    @off_main
    def prefill_seconds(self, prompt: list[int]) -> float:
        ll = self.ll
        ll.llama_memory_seq_rm(ll.llama_get_memory(self.ctx), 0, -1, -1)
        start = time.perf_counter()
        for i in range(0, len(prompt), self.n_batch):
            self._decode(prompt[i:i + self.n_batch], i)
        ll.llama_sampler_sample(self.sampler, self.ctx, -1)
        return time.perf_counter() - start

    def close(self) -> None:
        ll = self.ll
        ll.llama_batch_free(self.batch)
        ll.llama_sampler_free(self.sampler)
        ll.llama_free(self.ctx)
        ll.llama_model_free(self.model)


@off_main
def engine_rate(engine: Engine, n: int) -> float:
    """Tokens/s after the first token; the prompt is cleared from the cache first so each run is alike."""
    from chatglm_core.messages import Done

    engine.backend.clear_prefix_cache()
    first = tokens = 0
    for ev in engine.stream(STORY, GenerationOptions(temperature=0, max_new_tokens=n)):
        first = first or time.perf_counter()
        if isinstance(ev, Done):
            tokens = ev.usage.completion_tokens
    return (tokens - 1) / (time.perf_counter() - first)


@off_main
def engine_prefill_seconds(engine: Engine, messages: list[Message]) -> float:
    engine.backend.clear_prefix_cache()
    start = time.perf_counter()
    for _ in engine.stream(messages, GenerationOptions(temperature=0, max_new_tokens=1)):
        return time.perf_counter() - start
    raise AssertionError("no event")


def long_prompt(backend, tokens: int) -> list[Message]:
    text = "The keeper climbed the stairs, trimmed the wick and watched the sea. "
    words = text * max(1, tokens // 15)
    while backend.count_tokens([Message(Role.USER, words)]) > tokens:
        words = words[: int(len(words) * 0.95)]
    return [Message(Role.USER, words)]


def main() -> None:
    from chatglm_core.backends.llamacpp import LlamaCppBackend

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=1500)
    parser.add_argument("--data-dir", default="/tmp/chatglm-test-data")
    args = parser.parse_args()
    for threads in map(int, args.threads.split(",")):
        settings = load_settings(data_dir=Path(args.data_dir), model_path=None, device="cpu", backend="llamacpp",
                                 threads=threads)
        backend = LlamaCppBackend.from_settings(settings)
        engine = Engine(backend)
        raw = RawLoop(backend, threads)
        print(f"weights {backend.load}, {'on huge pages' if backend.huge_page_bytes else 'system pages'}, "
              "on both sides", flush=True)
        prompt = backend.prompt_ids(STORY)
        ours, theirs = [], []
        for _ in range(args.runs):
            theirs.append(raw.rate(prompt, args.tokens))
            ours.append(engine_rate(engine, args.tokens))
        o, t = statistics.median(ours), statistics.median(theirs)
        print(f"{threads} thread(s), {args.tokens} tokens: ours {o:.1f} tok/s, llama.cpp's loop {t:.1f} tok/s, "
              f"ratio {o / t:.3f}  (runs: ours {[round(x, 1) for x in ours]}, raw {[round(x, 1) for x in theirs]})",
              flush=True)
        messages = long_prompt(backend, args.prompt)
        ids = backend.prompt_ids(messages)
        ours, theirs = [], []
        for _ in range(max(1, args.runs // 2)):
            theirs.append(raw.prefill_seconds(ids))
            ours.append(engine_prefill_seconds(engine, messages))
        o, t = statistics.median(ours), statistics.median(theirs)
        print(f"{threads} thread(s), prefill of {len(ids)} tokens to the first token: ours {o:.2f} s, "
              f"llama.cpp's loop {t:.2f} s, ratio {t / o:.3f}", flush=True)
        engine.shutdown()
        raw.close()
        backend.close()


if __name__ == "__main__":
    main()
