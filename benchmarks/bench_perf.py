"""Performance figures, each measured side by side with its anchor in one run (`make bench`).

    python benchmarks/bench_perf.py [--tokens 64] [--runs 3] [--quick]

1. single-stream decode of the embedded GGUF: our llama.cpp backend (default: the weights as a
   float16 copy; and "native": the file's own Q4_1) vs llama-cpp-python's own
   ``Llama(...)(prompt, max_tokens=N)`` on the file itself, same prompt (goal >= 0.8x); the
   transformers backend beside them.
2. streaming overhead: tokens/s through ``Engine.stream`` vs the raw backend's ``stream``
   (goal >= 0.97x), per backend.
3. under load: 8 simultaneous callers through one engine, aggregate tokens/s vs one caller's
   (goal >= 5x), time to first token p50/p95, per backend.
4. start-up: a fresh process that loads the default backend and streams one token (warm cache;
   goal <= 5 s).
5. code interpreter: `benchmarks/bench_sandbox.py` (warm print(1) p50 goal <= 25 ms).
6. GPU: measured only where CUDA is available.

Runs alternate the compared sides and report medians: other work on the machine moves absolute
numbers, ratios taken side by side move less. Speed is reported here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatglm_core.backends.base import GenerationOptions  # noqa: E402
from chatglm_core.engine import Engine  # noqa: E402
from chatglm_core.messages import Done, Message, Role, TextDelta  # noqa: E402
from chatglm_core.settings import load_settings  # noqa: E402

STORY = [Message(Role.USER, "Write a long story about a lighthouse keeper and a storm.")]
LOAD_PROMPTS = ["Write a long story about a dragon.", "Describe the ocean in detail.", "Explain how rain forms.",
                "Tell me about the history of Rome.", "Write a poem about autumn leaves.",
                "Describe a busy city market.", "Explain how computers work.", "Write a letter to a friend."]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def line(name: str, value: str, anchor: str = "", ratio: float | None = None, goal: str = "") -> None:
    r = f"ratio {ratio:6.3f}" if ratio is not None else ""
    print(f"  {name:<34} {value:<16} {anchor:<30} {r:<13} {goal}", flush=True)


def off_main(fn):
    """Run `fn` on a fresh thread and wait. Measured work never runs on the main thread: on this
    machine llama.cpp and torch decode several times slower there (seen with both backends, even
    with llama-cpp-python alone), while the engine always generates on a worker thread."""
    def wrapper(*args, **kw):
        box: list = []
        t = threading.Thread(target=lambda: box.append(fn(*args, **kw)))
        t.start()
        t.join()
        return box[0]
    return wrapper


@off_main
def timed_stream(source, messages: list[Message], options: GenerationOptions) -> tuple[float, float, int]:
    """(seconds to first text, decode tok/s after the first token, completion tokens) of one stream."""
    t0 = time.perf_counter()
    first = None
    done = None
    for ev in source(messages, options):
        if isinstance(ev, TextDelta) and first is None:
            first = time.perf_counter()
        elif isinstance(ev, Done):
            done = ev
    end = time.perf_counter()
    k = done.usage.completion_tokens
    first = first or end
    return first - t0, (k - 1) / max(end - first, 1e-9), k


def greedy(n: int) -> GenerationOptions:
    return GenerationOptions(temperature=0, max_new_tokens=n)


# --- 1. single stream vs llama.cpp ------------------------------------------------------------------
def anchor_llama(gguf: Path, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_ctx=n_ctx, verbose=False)  # its default threads, as ours


@off_main
def anchor_run(llm, prompt_ids: list[int], n: int) -> tuple[float, float, int]:
    """llama-cpp-python's own completion, streamed: (first token s, decode tok/s, tokens)."""
    llm.reset()  # no prefix reuse from the previous run: prefill the whole prompt like our side
    t0 = time.perf_counter()
    first, k = None, 0
    for _ in llm(prompt_ids, max_tokens=n, temperature=0.0, top_k=1, stream=True):
        k += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, (k - 1) / max(end - first, 1e-9), k


def single_stream_llamacpp(settings, args):
    """The default llama.cpp backend (the embedded model's weights converted to float16) and the
    file's own weights ("native"), each against llama-cpp-python on the embedded GGUF file itself."""
    from chatglm_core.backends import llamacpp

    default = llamacpp.LlamaCppBackend.from_settings(settings)
    native = llamacpp.LlamaCppBackend.from_settings(settings.model_copy(update={"gguf_weights": "native"}))
    anchor = anchor_llama(default.source_gguf, default.context_window)
    ids = default.prompt_ids(STORY)
    for b in (default, native):
        timed_stream(b.stream, STORY, greedy(8))
    anchor_run(anchor, ids, 8)
    runs: dict[str, list] = {"default": [], "native": [], "anchor": []}
    for _ in range(args.runs):
        runs["anchor"].append(anchor_run(anchor, ids, args.tokens))
        runs["default"].append(timed_stream(default.stream, STORY, greedy(args.tokens)))
        runs["native"].append(timed_stream(native.stream, STORY, greedy(args.tokens)))
    anc = statistics.median(r[1] for r in runs["anchor"])
    print(f"  (llama.cpp: {default.n_threads} thread(s) per token, n_ctx {default.context_window} per row; anchor: "
          f"llama-cpp-python's defaults on {default.source_gguf.name})")
    for name, b in (("default", default), ("native", native)):
        ours = statistics.median(r[1] for r in runs[name])
        ratios = [o[1] / a[1] for o, a in zip(runs[name], runs["anchor"], strict=True)]
        weights = "float16 copy" if b.gguf != b.source_gguf else "its own Q4_1"
        line(f"llamacpp {name} ({weights}) decode", f"{ours:7.1f} tok/s", f"llama-cpp-python {anc:7.1f} tok/s",
             statistics.median(ratios), "goal >= 0.8")
        line(f"llamacpp {name} time to first token", f"{statistics.median(r[0] for r in runs[name]) * 1000:7.1f} ms",
             f"llama-cpp-python {statistics.median(r[0] for r in runs['anchor']) * 1000:7.1f} ms")
    del anchor
    native.close()
    return default


def single_stream_transformers(settings, args):
    from chatglm_core.backends.transformers_backend import TransformersBackend

    tfm = TransformersBackend.from_settings(settings.model_copy(update={"backend": "transformers"}))
    timed_stream(tfm.stream, STORY, greedy(8))
    runs = [timed_stream(tfm.stream, STORY, greedy(args.tokens)) for _ in range(args.runs)]
    line("transformers fp32 decode", f"{statistics.median(r[1] for r in runs):7.1f} tok/s",
         "(compare: llama.cpp rows above)")
    line("transformers time to first token", f"{statistics.median(r[0] for r in runs) * 1000:7.1f} ms")
    return tfm


# --- 2. streaming overhead ------------------------------------------------------------------------
def overhead(backend, args) -> None:
    engine = Engine(backend)
    timed_stream(engine.stream, STORY, greedy(8))
    raw_runs, eng_runs = [], []
    for _ in range(args.runs):
        raw_runs.append(timed_stream(backend.stream, STORY, greedy(args.tokens)))
        eng_runs.append(timed_stream(engine.stream, STORY, greedy(args.tokens)))
    # whole-run rate (prompt included) so the engine's queue hand-off before the first token counts too
    rate = [r[2] / (r[0] + (r[2] - 1) / r[1]) for r in raw_runs]
    erate = [r[2] / (r[0] + (r[2] - 1) / r[1]) for r in eng_runs]
    ratios = [e / r for e, r in zip(erate, rate, strict=True)]
    line(f"{type(backend).__name__} via Engine.stream", f"{statistics.median(erate):7.1f} tok/s",
         f"backend.stream {statistics.median(rate):7.1f} tok/s", statistics.median(ratios), "goal >= 0.97")


# --- 3. under load --------------------------------------------------------------------------------
def under_load(backend, args) -> None:
    engine = Engine(backend, max_batch=8)
    n = args.tokens
    timed_stream(engine.stream, STORY, greedy(8))
    singles = [timed_stream(engine.stream, [Message(Role.USER, LOAD_PROMPTS[0])], greedy(n)) for _ in range(args.runs)]
    single_rate = statistics.median(r[2] / (r[0] + (r[2] - 1) / r[1]) for r in singles)
    aggs, ttfts = [], []
    for _ in range(args.runs):
        results: dict[int, tuple[float, float, int]] = {}
        barrier = threading.Barrier(8)

        def caller(i: int, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            results[i] = timed_stream(engine.stream, [Message(Role.USER, LOAD_PROMPTS[i])], greedy(n))  # noqa: B023

        t0 = time.perf_counter()
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        aggs.append(sum(r[2] for r in results.values()) / wall)
        ttfts += [r[0] for r in results.values()]
    agg = statistics.median(aggs)
    name = type(backend).__name__
    line(f"{name} 8 callers aggregate", f"{agg:7.1f} tok/s", f"1 caller {single_rate:7.1f} tok/s",
         agg / single_rate, "goal >= 5")
    line(f"{name} 8 callers first token", f"p50 {pct(ttfts, .5) * 1000:6.0f} ms",
         f"p95 {pct(ttfts, .95) * 1000:6.0f} ms; 1 caller {statistics.median(r[0] for r in singles) * 1000:4.0f} ms")


# --- 4. start-up ----------------------------------------------------------------------------------
STARTUP = """
import time, sys
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
from chatglm_core.backends import load_backend
from chatglm_core.backends.base import GenerationOptions
from chatglm_core.engine import Engine
from chatglm_core.messages import Message, Role
from chatglm_core.settings import load_settings
engine = Engine(load_backend(load_settings(data_dir={data!r}, backend={backend!r})))
next(engine.stream([Message(Role.USER, "Hi")], GenerationOptions(temperature=0, max_new_tokens=4)))
print(type(engine.backend).__name__, time.perf_counter() - t0)
"""


def startup(data_dir: Path, backend: str, runs: int) -> None:
    times = []
    name = backend
    for _ in range(runs + 1):  # the first run warms caches (converted weights, tokenizer, page cache)
        t = time.perf_counter()
        code = STARTUP.format(root=str(ROOT), data=str(data_dir), backend=backend)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        times.append(time.perf_counter() - t)
        name = out.stdout.split()[0]
    line(f"start-up backend={backend} ({name})", f"{statistics.median(times[1:]):7.2f} s",
         "process start -> first token", None, "goal <= 5 s")


# --- 5. sandbox, 6. GPU ---------------------------------------------------------------------------
def sandbox(quick: bool) -> None:
    script = ROOT / "benchmarks" / "bench_sandbox.py"
    if not (ROOT / "chatglm_core" / "sandbox.py").exists() or not script.exists():
        print("  the sandbox is not on this branch")
        return
    out = subprocess.run([sys.executable, str(script), "--runs", "30" if quick else "100", "--starts",
                          "2" if quick else "5"], capture_output=True, text=True, check=False)
    for row in (out.stdout + (out.stderr if out.returncode else "")).strip().splitlines():
        print("  " + row)


def gpu(settings, args) -> None:
    import torch

    if not torch.cuda.is_available():
        print("  no CUDA device here: GPU not measured")
        return
    from chatglm_core.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend.from_settings(settings.model_copy(update={"backend": "transformers",
                                                                           "device": "cuda"}))
    runs = [timed_stream(backend.stream, STORY, greedy(args.tokens)) for _ in range(args.runs)]
    line("transformers on CUDA decode", f"{statistics.median(r[1] for r in runs):7.1f} tok/s")
    under_load(backend, args)


def part(name: str, settings, args) -> None:
    """One backend's figures, in a process of its own: llama.cpp's and torch's OpenMP thread pools
    in one process slow each other down, which would be a fault of the benchmark, not the backends."""
    if name == "llamacpp":
        from chatglm_core.backends import llamacpp

        if not llamacpp.available():
            print("  llama-cpp-python is not installed (`pip install -r requirements-llamacpp.txt`): skipped")
            return
        backend = single_stream_llamacpp(settings, args)
    else:
        backend = single_stream_transformers(settings, args)
    overhead(backend, args)
    under_load(backend, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer runs and start-ups (a smoke run)")
    ap.add_argument("--data-dir", default=os.environ.get("CHATGLM_DATA_DIR", "data"))
    ap.add_argument("--part", choices=["llamacpp", "transformers"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.runs, args.tokens = 1, min(args.tokens, 32)
    data_dir = Path(args.data_dir).resolve()
    settings = load_settings(data_dir=data_dir, device="cpu", model_path=None, backend="llamacpp")
    if args.part:
        part(args.part, settings, args)
        return
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start "
          "(other work on the machine moves absolute figures; compare ratios)")
    t0 = time.perf_counter()
    print(f"1-3. per backend (its own process): single-stream decode, greedy, {args.tokens} tokens, median of "
          f"{args.runs} alternating runs; streaming overhead (whole run incl. first token); 8 simultaneous callers")
    for name in ("llamacpp", "transformers"):
        print(f" [{name}]", flush=True)
        subprocess.run([sys.executable, __file__, "--part", name, "--data-dir", str(data_dir), "--runs",
                        str(args.runs), "--tokens", str(args.tokens)], check=True)
    print("4. start-up, warm cache")
    startup(data_dir, "auto", 1 if args.quick else 3)
    print("5. code interpreter sandbox")
    sandbox(args.quick)
    print("6. GPU")
    gpu(settings, args)
    print(f"(benchmark took {time.perf_counter() - t0:.0f} s; load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
