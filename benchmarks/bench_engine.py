"""Engine benchmark: load time (cold/warm), time to first token, decode tokens/s, streaming overhead.

    python benchmarks/bench_engine.py [--tokens 128] [--runs 3]

Cold load dequantizes the embedded GGUF into a fresh cache dir; warm load reads the cached
safetensors. Streaming overhead compares tokens/s through `Engine.stream` with a raw greedy
`model.generate` on the same prompt and token count, in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatglm_core.backends.base import GenerationOptions  # noqa: E402
from chatglm_core.backends.transformers_backend import TransformersBackend  # noqa: E402
from chatglm_core.engine import Engine  # noqa: E402
from chatglm_core.messages import Message, Role, TextDelta  # noqa: E402
from chatglm_core.settings import load_settings  # noqa: E402

PROMPT = [Message(Role.USER, "Write a long story about a lighthouse keeper and a storm.")]


def timed_load(data_dir: Path) -> tuple[float, TransformersBackend]:
    t = time.perf_counter()
    backend = TransformersBackend.from_settings(load_settings(data_dir=data_dir, device="cpu"))
    return time.perf_counter() - t, backend


def engine_run(engine: Engine, n: int) -> tuple[float, float, int]:
    """(time to first token, decode tok/s after the first token, tokens)"""
    opts = GenerationOptions(temperature=0, max_new_tokens=n)
    t0 = time.perf_counter()
    first = None
    for ev in engine.stream(PROMPT, opts):
        if isinstance(ev, TextDelta) and first is None:
            first = time.perf_counter()
        elif not isinstance(ev, TextDelta):
            done = ev
    end = time.perf_counter()
    k = done.usage.completion_tokens
    return first - t0, (k - 1) / (end - first), k


def raw_generate(backend: TransformersBackend, n: int) -> float:
    import torch

    ids = torch.tensor([backend.prompt_ids(PROMPT)])
    with torch.inference_mode():
        t = time.perf_counter()
        out = backend.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        dt = time.perf_counter() - t
    return (out.shape[1] - ids.shape[1]) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cold_dir:
        cold, _ = timed_load(Path(cold_dir))
        warm, backend = timed_load(Path(cold_dir))
    engine = Engine(backend)
    engine_run(engine, 8)  # warm-up
    runs = [engine_run(engine, args.tokens) for _ in range(args.runs)]
    raw = [raw_generate(backend, args.tokens) for _ in range(args.runs)]
    ttft = statistics.median(r[0] for r in runs)
    tps = statistics.median(r[1] for r in runs)
    raw_tps = statistics.median(raw)
    # generate's figure includes the prompt pass; compare like with like: whole-run tokens/s
    whole = statistics.median(r[2] / (r[0] + (r[2] - 1) / r[1]) for r in runs)
    print(f"model                  {backend.model_name} on {backend.device}")
    print(f"load cold (dequantize) {cold:8.2f} s")
    print(f"load warm (cached)     {warm:8.2f} s")
    print(f"time to first token    {ttft * 1000:8.1f} ms")
    print(f"decode                 {tps:8.1f} tok/s (engine stream, after first token)")
    print(f"engine whole run       {whole:8.1f} tok/s ({args.tokens} tokens, incl. prompt)")
    print(f"raw model.generate     {raw_tps:8.1f} tok/s ({args.tokens} tokens, incl. prompt)")
    print(f"streaming overhead     ratio engine/raw = {whole / raw_tps:.3f}")


if __name__ == "__main__":
    main()
