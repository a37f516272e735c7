"""Our API server beside llama.cpp's own `llama-server`, on the same file, through the same client.

    LLAMA_SERVER=/path/to/llama-server python benchmarks/bench_vs_llama_server.py [--runs 3] [--threads N]

`make bench` builds llama-server once (`make llama-server`: llama.cpp's source from the
llama-cpp-python sdist our backend is built from) and runs this. Both servers serve the GGUF our
engine computes with by default (the embedded SmolLM2's cached float16 copy, `compute_file`):
ours is `python -m chatglm_core.api` with its defaults; llama-server runs with its defaults plus
`-np 8` (8 slots, as our engine batches 8 rows), `-c` = 8 x our 4,096-token row (its default, the
model's 8,192 tokens split over 8 slots, could not hold the 1.5k-token conversation twice over),
`--no-repack` (issue 14: repacked weights crash on AMX CPUs; llama.cpp repacks only quantized
types, so it changes nothing for the float16 file) and `-t` = our thread count. Its default maps the
file; ours reads a file this size into memory (`CHATGLM_LLAMA_LOAD=auto`), which decodes faster
here: `--peer-load-mode none` gives llama-server the same. Both are driven by the official `openai`
client, streaming, greedy:

1. one stream, 128 tokens: decode tokens/s after the first token;
2. 8 streams at once: aggregate tokens/s (all completion tokens / wall time), first token p50/p95;
3. the first turn of a ~1.5k-token conversation nobody has seen (a fresh nonce per run): time to
   first token;
4. the next turn of that conversation (its reply and one more question appended): time to first
   token; llama-server reuses the slot's cached prefix here;
5. a tool-mode round after the first (the same tools and system prompt, then the call and its
   result): time to first token, and the prompt tokens served from a cache
   (`usage.prompt_tokens_details.cached_tokens`, "n/a" where a server does not report it) out of
   the prompt's tokens. Not like for like: llama-server's chat parser keeps tools only for templates
   that declare them, and SmolLM2's does not, so its prompt has no tool list and no call (~77
   tokens, against our ~400 with the tools described in the system prompt).

Each run starts both servers afresh: a server process keeps its speed for its whole lifetime, a
few per cent off another process of the same code, so pairs taken from one pair of processes can all
lean one way (here one A/B of two of our servers won a cold turn 8 of 8 pairs, and 1 of 8 when
repeated with fresh processes; two bench runs minutes apart had our cold turn win 2 of 15 pairs, then
14 of 15). The sides alternate in each run (which goes first swaps every run; rows 3-4 take
`--turn-samples` conversations a run, the first side swapping each time) and each figure is the
median over all samples. The ratio is always speed, ours over theirs: above 1.0 we are faster. The
last column pairs each of our samples with llama-server's taken next to it and counts the pairs we
won. Speed is reported, never asserted (tests/test_benchmarks.py runs this end to end on a few
tokens).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_LLAMA_SERVER = ROOT / ".llama-server" / "bin" / "llama-server"

STORY = "Write a long story about a lighthouse keeper and a storm."
LOAD_PROMPTS = ["Write a long story about a dragon.", "Describe the ocean in detail.", "Explain how rain forms.",
                "Tell me about the history of Rome.", "Write a poem about autumn leaves.",
                "Describe a busy city market.", "Explain how computers work.", "Write a letter to a friend."]
TOPICS = ["the harbour", "the old mill", "the village school", "the river bridge", "the night market",
          "the mountain pass", "the library", "the train station"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_current_time", "description": "The current time in an IANA time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "description": "e.g. Europe/Paris"}},
                   "required": ["zone"]}}}
CALC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
TOOLS = [WEATHER, TIME, CALC]

ROWS = ["one stream, greedy, decode", "8 streams at once, aggregate", "8 streams, first token p50",
        "8 streams, first token p95", "first turn, ~1.5k-token conversation", "next turn of that conversation",
        "tool round after the first", "tool round, cached of prompt tokens"]


# --- the two servers -------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(name: str, cmd: list[str], url: str, env: dict[str, str], health: str) -> Any:
    """A server process until the block ends; waits until `health` answers 200."""
    log = open(os.devnull, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + health, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not answer {health} within 300 s")
            time.sleep(0.3)
        proc.stderr.close()  # nobody reads it from here on: a full pipe must not block the server
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@dataclass
class Side:
    name: str
    client: openai.OpenAI | None = None  # the running server's (connect)
    model: str = ""
    figures: dict[str, list[float]] = field(default_factory=dict)
    cached: list[tuple[int | None, int]] = field(default_factory=list)  # tool rounds: (cached, prompt tokens)
    prompt_tokens: int = 0  # of the conversation's first turn, as the server counts them

    def add(self, row: str, value: float) -> None:
        self.figures.setdefault(row, []).append(value)


def connect(s: Side, url: str) -> None:
    """Point `s` at a (freshly started) server."""
    s.client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    s.model = s.client.models.list().data[0].id


# --- one streamed request ------------------------------------------------------------------
@dataclass
class Streamed:
    first: float  # seconds to the first content (or tool-call) delta; the end when there was none
    decode: float  # tokens/s after the first token
    tokens: int
    text: str
    cached: int | None
    prompt_tokens: int


def stream(s: Side, messages: list[dict[str, Any]], max_tokens: int, **kw: Any) -> Streamed:
    t0 = time.perf_counter()
    first, text, usage = None, "", None
    for chunk in s.client.chat.completions.create(model=s.model, messages=messages, max_tokens=max_tokens,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content or delta.tool_calls:
            first = first or time.perf_counter()
            text += delta.content or ""
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None else 0
    first = first or end
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    prompt = usage.prompt_tokens if usage is not None else 0
    return Streamed(first - t0, max(tokens - 1, 0) / max(end - first, 1e-9), tokens, text, cached, prompt)


# --- the measures ----------------------------------------------------------------------------
def one_stream(s: Side, tokens: int) -> None:
    s.add(ROWS[0], stream(s, [{"role": "user", "content": STORY}], tokens).decode)


def eight_streams(s: Side, tokens: int, first_tokens: dict[str, list[float]]) -> None:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(lambda p: stream(s, [{"role": "user", "content": p}], tokens), LOAD_PROMPTS))
    s.add(ROWS[1], sum(r.tokens for r in runs) / (time.perf_counter() - t0))
    first_tokens.setdefault(s.name, []).extend(r.first for r in runs)


def conversation(nonce: str) -> list[dict[str, Any]]:
    """~1.5k tokens of chat history that no server has seen (the nonce leads the system prompt)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": f"Session {nonce}. You are a helpful guide "
                                                                    "to a small coastal town."}]
    for i, topic in enumerate(TOPICS):
        messages.append({"role": "user", "content": f"Tell me about {topic}. What should a visitor see there, "
                                                   "and when is the best time to go?"})
        messages.append({"role": "assistant", "content": (
            f"{topic.capitalize()} is one of the town's oldest places. " * 2
            + f"Visitors walk along {topic} in the morning, when the light is soft and the streets are quiet. "
              "Local families have kept the stone walls and wooden doors as their grandparents built them. "
              "In summer there are small concerts, and in winter the cafés stay open late for travellers. "
              "Guides meet groups by the fountain at ten and at two, and a map at the town hall shows the "
              "quieter lanes, the bakeries that open first and the path down to the water. "
              "Most visitors stay an hour; those who love old buildings stay the whole morning. "
            + f"Stop number {i + 1} on the walking tour has a bench with a view over the bay.")})
    messages.append({"role": "user", "content": "Which two places would you pick for a single afternoon, and why?"})
    return messages


def conversation_turns(s: Side, nonce: str, tokens: int) -> None:
    messages = conversation(nonce)
    first = stream(s, messages, tokens)
    s.add(ROWS[4], first.first)
    s.prompt_tokens = first.prompt_tokens
    messages += [{"role": "assistant", "content": first.text},
                 {"role": "user", "content": "And where should I eat dinner after that?"}]
    s.add(ROWS[5], stream(s, messages, tokens).first)


def tool_rounds(s: Side, nonce: str, tokens: int) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": f"Session {nonce}. Use the tools when they help."},
        {"role": "user", "content": "What's the weather in Paris right now, and what time is it there?"}]
    stream(s, messages, tokens, tools=TOOLS)  # the first round: the model's reply is not needed
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 14, "sky": "cloudy"}'}]
    second = stream(s, messages, tokens, tools=TOOLS)
    s.add(ROWS[6], second.first)
    s.cached.append((second.cached, second.prompt_tokens))


# --- the table ---------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def wins(mine: list[float], theirs: list[float], rate: bool) -> str:
    """'k of n': the side-by-side samples where ours was faster; blank for a percentile row (one figure)."""
    if len(mine) != len(theirs) or len(mine) < 2:
        return ""
    won = sum((a > b) if rate else (a < b) for a, b in zip(mine, theirs))
    return f"{won} of {len(mine)}"


def report(ours: Side, peer: Side, first_tokens: dict[str, list[float]]) -> None:
    for s in (ours, peer):
        s.figures[ROWS[2]] = [pct(first_tokens.get(s.name, []), 0.5)]
        s.figures[ROWS[3]] = [pct(first_tokens.get(s.name, []), 0.95)]
    print("\n| measure | ours (defaults) | llama-server (defaults, -np 8) | ratio (speed, ours/theirs) "
          "| ours faster in |")
    print("|---|---|---|---|---|")
    for row in ROWS[:7]:
        mine, theirs = ours.figures.get(row, []), peer.figures.get(row, [])
        a, b = median(mine), median(theirs)
        rate = row in ROWS[:2]
        unit = (lambda v: f"{v:.1f} tok/s") if rate else (lambda v: f"{v * 1000:.0f} ms")
        ratio = a / b if rate else b / a
        print(f"| {row} | {unit(a)} | {unit(b)} | {ratio:.2f}x | {wins(mine, theirs, rate)} |", flush=True)
    counts = [", ".join(f"{'n/a' if c is None else c} of {n}" for c, n in s.cached) for s in (ours, peer)]
    print(f"| {ROWS[7]} | {counts[0]} | {counts[1]} | | |", flush=True)
    print(f"(the conversation's first turn: {ours.prompt_tokens} prompt tokens as we count them, "
          f"{peer.prompt_tokens} as llama-server does)")


# --- main ---------------------------------------------------------------------------------------
def model_file(data_dir: Path) -> tuple[Path, int, int]:
    """(the GGUF our engine computes with by default, its context per row, our threads per step)."""
    from chatglm_core.backends import llamacpp
    from chatglm_core.models.loader import cpu_threads
    from chatglm_core.settings import load_settings

    if not llamacpp.available():
        raise SystemExit("llama-cpp-python is not installed: the comparison runs our llama.cpp backend "
                         "(`pip install -r requirements-llamacpp.txt`)")
    settings = load_settings(data_dir=data_dir, model_path=None, device="cpu")
    return llamacpp.compute_file(llamacpp.gguf_path(settings), settings), llamacpp.DEFAULT_N_CTX, cpu_threads(settings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128, help="tokens per reply in the stream rows")
    ap.add_argument("--turn-tokens", type=int, default=32, help="tokens per reply in the conversation and tool rows")
    ap.add_argument("--turn-samples", type=int, default=3, help="conversations per run in the first/next-turn rows")
    ap.add_argument("--threads", type=int, help="CHATGLM_THREADS for ours and -t for llama-server "
                                                "(default: ours's default, the physical cores)")
    ap.add_argument("--data-dir", default=os.environ.get("CHATGLM_DATA_DIR", "data"))
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER") or str(DEFAULT_LLAMA_SERVER))
    ap.add_argument("--peer-load-mode", choices=["none", "mmap"],
                    help="llama-server's --load-mode (default: its own, which maps the file); `none` reads the "
                         "weights into its memory, as ours does by default for a file this size")
    args = ap.parse_args()
    binary = Path(args.llama_server)
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"no llama-server at {binary}: run `make llama-server` (builds it once, several "
                         "minutes) or set LLAMA_SERVER=/path/to/llama-server")
    data_dir = Path(args.data_dir).resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATGLM_") and k != "MODEL_PATH"}
    if args.threads:
        env["CHATGLM_THREADS"] = str(args.threads)
        os.environ["CHATGLM_THREADS"] = str(args.threads)
    gguf, n_ctx, threads = model_file(data_dir)

    def ours_cmd(port: int) -> list[str]:
        return [sys.executable, "-m", "chatglm_core.api", "--port", str(port), "--data-dir", str(data_dir),
                "--log-level", "warning"]

    def peer_cmd(port: int) -> list[str]:
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", "8",
               "-c", str(8 * n_ctx), "--no-repack", "-t", str(threads)]
        return cmd + (["--load-mode", args.peer_load_mode] if args.peer_load_mode else [])

    print(f"machine: {os.cpu_count()} CPUs ({_cpu_model()}), load average {os.getloadavg()[0]:.1f} at start; "
          f"{threads} thread(s) per step on both sides; file {gguf.name}; {args.runs} run(s), medians")
    peer_load = {None: "mapped (its default)", "none": "read into memory (--load-mode none)",
                 "mmap": "mapped (--load-mode mmap)"}[args.peer_load_mode]
    print(f"weights: ours {_our_load_mode(gguf)} (CHATGLM_LLAMA_LOAD=auto), llama-server {peer_load}")
    ours, peer = Side("ours"), Side("llama-server")
    first_tokens: dict[str, list[float]] = {}
    for run in range(args.runs):
        # both servers start afresh each run (see the module's docstring)
        with ExitStack() as stack:
            for s, label, cmd in ((ours, "our API server", ours_cmd), (peer, "llama-server", peer_cmd)):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                stack.enter_context(serving(label, cmd(port), url, env, "/health"))
                connect(s, url)
            for s in (ours, peer):  # warm-up: first-request costs (grammar compilers, page cache) are not the measure
                stream(s, [{"role": "user", "content": "Hi"}], 4)
                stream(s, [{"role": "user", "content": "Hi"}], 4, tools=TOOLS)
            order = (ours, peer) if run % 2 == 0 else (peer, ours)
            for s in order:
                one_stream(s, args.tokens)
            for s in order:
                eight_streams(s, args.tokens, first_tokens)
            for k in range(args.turn_samples):
                for s in order if k % 2 == 0 else order[::-1]:
                    conversation_turns(s, uuid.uuid4().hex[:12], args.turn_tokens)
            for s in order:
                tool_rounds(s, uuid.uuid4().hex[:12], args.turn_tokens)
    report(ours, peer, first_tokens)


def _our_load_mode(gguf: Path) -> str:
    from chatglm_core.backends import llamacpp

    return {"read": "read into memory", "mmap": "mapped (mmap)"}[llamacpp.load_mode("auto", gguf)]


def _cpu_model() -> str:
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
