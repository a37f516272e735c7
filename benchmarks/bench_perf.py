"""Performance figures, each measured side by side with its anchor in one run (`make bench`).

    python benchmarks/bench_perf.py [--tokens 64] [--runs 3] [--quick]

1. single-stream decode of the embedded GGUF: our llama.cpp backend (default: the weights as a
   float16 copy; and "native": the file's own Q4_1) vs llama-cpp-python's own
   ``Llama(...)(prompt, max_tokens=N)`` on the file itself, same prompt (goal >= 0.8x); the
   transformers backend beside them.
2. streaming overhead: tokens/s through ``Engine.stream``, through the HTTP API (uvicorn on
   loopback, SSE read by an httpx client) and through the Streamlit chat page (AppTest, headless)
   vs the raw backend's ``stream`` on the same loaded model (goal >= 0.97x), per backend.
3. under load: 8 simultaneous callers through one engine, aggregate tokens/s vs one caller's
   (goal >= 5x), time to first token p50/p95, per backend; greedy, and sampled as users decode
   (temperature 0.7, top_p 0.9, repetition penalty 1.05; also a single-stream sampled row in 1);
   and a ~1,600-token prompt joining while another caller streams (that caller's longest gap).
4. start-up: a fresh process that loads the default backend and streams one token (warm cache;
   goal <= 5 s).
5. code interpreter: `benchmarks/bench_sandbox.py` (warm print(1) p50 goal <= 25 ms).
6. GPU: measured only where CUDA is available.

Runs alternate the compared sides and report medians: other work on the machine moves absolute
numbers, ratios taken side by side move less. Speed is reported here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


#: the sampled runs: our fallback sampling, the same on both sides (llama.cpp's top_k/min_p off)
SAMPLED = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.05}


def sampled(n: int, seed: int = 0) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=n, seed=seed, **SAMPLED)


# --- 1. single stream vs llama.cpp ------------------------------------------------------------------
def anchor_llama(gguf: Path, n_ctx: int, extra_buffers: bool):
    """llama-cpp-python's `Llama` on `gguf`, its default threads as ours. `Llama(...)` has no argument
    for llama.cpp's extra (repacked) buffers, which crash on AMX CPUs (backends.llamacpp.use_extra_buffers):
    its model parameters get the same choice as our backend's while it loads."""
    from unittest import mock

    import llama_cpp.llama_cpp as low
    from llama_cpp import Llama

    defaults = low.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = extra_buffers
        return p

    with mock.patch.object(low, "llama_model_default_params", params):
        return Llama(model_path=str(gguf), n_ctx=n_ctx, verbose=False)


@off_main
def anchor_run(llm, prompt_ids: list[int], n: int, sample: bool = False) -> tuple[float, float, int]:
    """llama-cpp-python's own completion, streamed: (first token s, decode tok/s, tokens)."""
    llm.reset()  # no prefix reuse from the previous run: prefill the whole prompt like our side
    how = ({"temperature": SAMPLED["temperature"], "top_p": SAMPLED["top_p"], "top_k": 0, "min_p": 0.0, "seed": 0,
            "repeat_penalty": SAMPLED["repetition_penalty"]} if sample else {"temperature": 0.0, "top_k": 1})
    t0 = time.perf_counter()
    first, k = None, 0
    for _ in llm(prompt_ids, max_tokens=n, stream=True, **how):
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
    anchor = anchor_llama(default.source_gguf, default.context_window, native.extra_buffers)
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
    # sampled, as users decode, on the same float16 file: each side's own sampler (ours in torch,
    # llama.cpp's in C) and nothing else differs
    anchor = anchor_llama(default.gguf, default.context_window, default.extra_buffers)
    anchor_run(anchor, ids, 8, sample=True)
    ours_s, anchor_s = [], []
    for i in range(args.runs):
        anchor_s.append(anchor_run(anchor, ids, args.tokens, sample=True))
        ours_s.append(timed_stream(default.stream, STORY, sampled(args.tokens, seed=i)))
    line("llamacpp default decode, sampled", f"{statistics.median(r[1] for r in ours_s):7.1f} tok/s",
         f"same file {statistics.median(r[1] for r in anchor_s):7.1f} tok/s",
         statistics.median(o[1] / a[1] for o, a in zip(ours_s, anchor_s, strict=True)),
         "temperature 0.7, top_p 0.9, penalty 1.05")
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
def whole_rate(run: tuple[float, float, int]) -> float:
    """Tokens over the whole run (first token included), so a hand-off before it counts too."""
    first_s, decode, k = run
    return k / (first_s + (k - 1) / decode)


def side_by_side(name: str, raw, through, anchor: str, runs: int) -> None:
    """Alternate `raw()` and `through()` runs; print the median whole-run rates and paired ratio."""
    raw_runs, path_runs = [], []
    for _ in range(runs):
        raw_runs.append(raw())
        path_runs.append(through())
    rate = [whole_rate(r) for r in raw_runs]
    prate = [whole_rate(r) for r in path_runs]
    ratios = [p / r for p, r in zip(prate, rate, strict=True)]
    line(name, f"{statistics.median(prate):7.1f} tok/s", f"{anchor} {statistics.median(rate):7.1f} tok/s",
         statistics.median(ratios), "goal >= 0.97")


def overhead(backend, args) -> None:
    engine = Engine(backend)
    timed_stream(engine.stream, STORY, greedy(8))
    side_by_side(f"{type(backend).__name__} via Engine.stream",
                 lambda: timed_stream(backend.stream, STORY, greedy(args.tokens)),
                 lambda: timed_stream(engine.stream, STORY, greedy(args.tokens)), "backend.stream", args.runs)


class LoopbackServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) from a thread of this process, so the API is
    measured over the very backend object the other rows use. Config as `python -m chatglm_core.api`
    (uvicorn's defaults: the asyncio loop, its best installed HTTP parser)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the benchmark's uvicorn server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@off_main
def timed_sse(http, body: dict) -> tuple[float, float, int]:
    """timed_stream for one streamed /v1/chat/completions, as its client sees it: the clock stops
    at `data: [DONE]`; tokens are the final chunk's usage.completion_tokens."""
    t0 = time.perf_counter()
    first = None
    k = 0
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for raw in resp.iter_lines():
            if not raw.startswith("data: "):
                continue
            if raw == "data: [DONE]":
                break
            chunk = json.loads(raw[6:])
            if "error" in chunk:
                raise RuntimeError(f"the API streamed an error: {chunk['error']}")
            if chunk.get("usage"):
                k = chunk["usage"]["completion_tokens"]
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return first - t0, (k - 1) / max(end - first, 1e-9), k


def api_overhead(backend, settings, args) -> None:
    """Tokens/s through the HTTP API (an SSE stream on loopback, parsed by an httpx client) vs the
    raw backend. The raw side gets the exact messages and options the server derives from the
    request, so both sides do the same model work. Included: the request (HTTP, validation, the
    plan) before the first token, the bridge to the event loop, one JSON chunk per token through
    Starlette and uvicorn, the socket, and the client's reading and parsing. The client runs in
    this process and so shares the server's GIL, which a real client doesn't: if anything the
    figure is slightly pessimistic."""
    import httpx

    from chatglm_core.api.app import create_app
    from chatglm_core.api.chat import plan_chat
    from chatglm_core.api.schemas import ChatCompletionRequest

    engine = Engine(backend)
    body = {"model": engine.model_name, "messages": [m.to_openai() for m in STORY], "temperature": 0,
            "max_tokens": args.tokens, "stream": True, "stream_options": {"include_usage": True}}
    plan = plan_chat(ChatCompletionRequest(**body), settings, backend)
    served = settings.model_copy(update={"api_key": None})  # no key from the environment
    with LoopbackServer(create_app(served, engine)) as srv, httpx.Client(base_url=srv.url, timeout=600) as http:
        timed_sse(http, {**body, "max_tokens": 8})
        side_by_side(f"{type(backend).__name__} via API SSE",
                     lambda: timed_stream(backend.stream, plan.messages, plan.options[0]),
                     lambda: timed_sse(http, body), "backend.stream", args.runs)


@off_main
def timed_app_turn(marks: dict) -> tuple[float, float, int]:
    """One chat turn in a fresh AppTest session of main.py; the times come from `app_marks`."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "main.py"), default_timeout=600).run()  # page drawn, not timed
    marks.clear()
    at.chat_input(key="input_chat").set_value(STORY[-1].content).run()
    if at.exception:
        raise RuntimeError(f"the chat page failed: {at.exception}")
    k, end = marks["tokens"], marks["end"]
    first = marks.get("first", end)  # no text at all: as timed_stream counts it
    return first - marks["t0"], (k - 1) / max(end - first, 1e-9), k


def _wait_for_script(runner, timeout: float = 3) -> None:
    """AppTest's own wait for the end of a script run, polling every 50 ms instead of every 1 ms: its
    thousand GIL wake-ups a second, which no Streamlit server makes, slowed the model's thread down
    (only the end of the run is late by this, after the timed window)."""
    deadline = time.monotonic() + timeout
    while not runner.script_stopped():
        if time.monotonic() > deadline:
            runner.request_stop()
            raise RuntimeError(f"AppTest script run timed out after {timeout}(s)")
        time.sleep(0.05)


def _no_context_warning(record: logging.LogRecord) -> bool:
    # AppTest sets session state from its driving thread, which has no script context, and streamlit
    # warns about it on every run (a filter: streamlit resets its loggers' levels when it loads its config)
    return "missing ScriptRunContext" not in record.getMessage()


@contextmanager
def app_marks(engine: Engine, settings, tokens: int) -> Iterator[dict]:
    """Point the app (webui.state) at `engine` and `settings`, and record into the yielded dict when
    the chat page calls engine.stream (t0), when it has written its first text into the page
    (first) and when it has written the final reply (end)."""
    from streamlit.testing.v1 import local_script_runner

    from webui import state, turn

    marks: dict = {}
    real_stream, real_text, real_done = engine.stream, turn._LiveTurn._text, turn._LiveTurn._done

    def stream(messages, options=None, **kw):
        marks.update(t0=time.perf_counter(), messages=messages, options=options)
        return real_stream(messages, options, **kw)

    def text(live, piece: str, *when) -> None:  # when: the arrival time webui.turn passes on
        real_text(live, piece, *when)
        marks.setdefault("first", time.perf_counter())

    def done(live, ev: Done, *when) -> None:
        real_done(live, ev, *when)
        marks.update(end=time.perf_counter(), tokens=ev.usage.completion_tokens)

    app_settings = settings.model_copy(update={"temperature": 0.0, "max_new_tokens": tokens, "system_prompt": "",
                                               "repetition_penalty": 1.0})
    saved = state.settings, state.build_engine, local_script_runner.require_widgets_deltas
    local_script_runner.require_widgets_deltas = _wait_for_script
    ctx_log = logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context")
    ctx_log.addFilter(_no_context_warning)
    engine.stream = stream
    turn._LiveTurn._text, turn._LiveTurn._done = text, done
    state.settings, state.build_engine = (lambda: app_settings), (lambda s: engine)
    state._engine_or_error.clear()
    state.store.clear()
    try:
        yield marks
    finally:
        state.settings, state.build_engine, local_script_runner.require_widgets_deltas = saved
        ctx_log.removeFilter(_no_context_warning)
        turn._LiveTurn._text, turn._LiveTurn._done = real_text, real_done
        state._engine_or_error.clear()
        state.store.clear()


def app_overhead(backend, settings, args) -> None:
    """Tokens/s through the Streamlit chat page vs the raw backend, on the same messages and options.

    Included: main.py's chat page run headless by streamlit's AppTest on the loaded model:
    engine.stream called from the page's pump thread, the hand-over queue, the script thread's
    per-delta work (to_markdown of the growing reply, st.markdown into the bubble: a protobuf
    delta into the session's forward-message queue, Streamlit's rerun check) and the final render.
    Timed from the page's engine.stream call to the final reply written into the page.
    Not included: the page draw before the turn and the rerun after it (per message, not per
    token), and the websocket and browser (AppTest has no server: deltas stop at the queue the
    server would send from).
    """
    with tempfile.TemporaryDirectory() as data, \
            app_marks(Engine(backend), settings.model_copy(update={"data_dir": Path(data)}), args.tokens) as marks:
        timed_app_turn(marks)  # warm-up; also shows which messages and options the page sends
        messages, options = marks["messages"], marks["options"]
        side_by_side(f"{type(backend).__name__} via app page",
                     lambda: timed_stream(backend.stream, messages, options),
                     lambda: timed_app_turn(marks), "backend.stream", args.runs)


# --- 3. under load --------------------------------------------------------------------------------
def under_load(backend, args) -> None:
    engine = Engine(backend, max_batch=8)
    n = args.tokens
    timed_stream(engine.stream, STORY, greedy(8))
    name = type(backend).__name__
    for label, options in (("", greedy), (", sampled", sampled)):
        singles = [timed_stream(engine.stream, [Message(Role.USER, LOAD_PROMPTS[0])], options(n)) for _ in range(args.runs)]
        single_rate = statistics.median(whole_rate(r) for r in singles)
        aggs, ttfts = [], []
        for _ in range(args.runs):
            results: dict[int, tuple[float, float, int]] = {}
            barrier = threading.Barrier(8)

            def caller(i: int, barrier: threading.Barrier = barrier, options=options) -> None:
                barrier.wait()
                results[i] = timed_stream(engine.stream, [Message(Role.USER, LOAD_PROMPTS[i])], options(n))  # noqa: B023

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
        line(f"{name} 8 callers aggregate{label}", f"{agg:7.1f} tok/s", f"1 caller {single_rate:7.1f} tok/s",
             agg / single_rate, "goal >= 5")
        line(f"{name} 8 callers first token{label}", f"p50 {pct(ttfts, .5) * 1000:6.0f} ms",
             f"p95 {pct(ttfts, .95) * 1000:6.0f} ms; 1 caller {statistics.median(r[0] for r in singles) * 1000:4.0f} ms")
    long_prompt_joins(engine, name)


LONG_PROMPT = ("Here is a document. " + "The committee met on Tuesday to discuss the budget and the new park. " * 110
               + "\nSummarize it.")


def long_prompt_joins(engine: Engine, name: str) -> None:
    """A ~1,600-token prompt joins while another caller streams: the streaming caller's longest wait
    between two tokens, and the long prompt's time to first token."""
    gaps: list[float] = []
    started = threading.Event()

    def streamer() -> None:
        last = None
        for ev in engine.stream(STORY, greedy(200)):
            now = time.perf_counter()
            if isinstance(ev, TextDelta):
                if last is not None:
                    gaps.append(now - last)
                last = now
                started.set()

    t = threading.Thread(target=streamer)
    t.start()
    started.wait()
    time.sleep(0.3)
    first_token, _, _ = timed_stream(engine.stream, [Message(Role.USER, LONG_PROMPT)], greedy(8))
    t.join()
    tokens = engine.backend.count_tokens([Message(Role.USER, LONG_PROMPT)])
    line(f"{name} {tokens}-token prompt joins", f"max gap {max(gaps) * 1000:5.0f} ms",
         f"median gap {statistics.median(gaps) * 1000:4.0f} ms; its first token {first_token:5.2f} s")


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
    api_overhead(backend, settings, args)
    app_overhead(backend, settings, args)
    under_load(backend, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer runs and start-ups (a smoke run)")
    ap.add_argument("--data-dir", default=os.environ.get("CHATGLM_DATA_DIR", "data"))
    ap.add_argument("--threads", type=int, help="CHATGLM_THREADS for every part (default: the physical cores)")
    ap.add_argument("--part", choices=["llamacpp", "transformers"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        os.environ["CHATGLM_THREADS"] = str(args.threads)  # the parts and the start-up runs inherit it
    if args.quick:
        args.runs, args.tokens = 1, min(args.tokens, 32)
    data_dir = Path(args.data_dir).resolve()
    settings = load_settings(data_dir=data_dir, device="cpu", model_path=None, backend="llamacpp")
    if args.part:
        part(args.part, settings, args)
        return
    from chatglm_core.models.loader import cpu_threads

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start "
          "(other work on the machine moves absolute figures; compare ratios); "
          f"{cpu_threads(settings)} thread(s) per model step (--threads)")
    t0 = time.perf_counter()
    print(f"1-3. per backend (its own process): single-stream decode, greedy, {args.tokens} tokens, median of "
          f"{args.runs} alternating runs; streaming overhead via engine, API and app (whole run incl. first "
          "token); 8 simultaneous callers")
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
