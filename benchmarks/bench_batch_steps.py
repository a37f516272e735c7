"""What one decode step costs for 1, 2, 4 and 8 rows: the ceiling continuous batching can reach.

    python benchmarks/bench_batch_steps.py [--steps 40]

For each llama.cpp weight mode (float16 = the default copy, native = the file's Q4_1, bfloat16) and
transformers float32: 8 sequences are prefilled with 40 tokens, then the median time of a step that
feeds one token to each of n rows. n rows / step time is the best aggregate tokens/s an engine
could get from batching n callers; the engine's own figure is in `make bench`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatglm_core.settings import load_settings

ROWS = (1, 2, 4, 8)


def llama_steps(mode: str, steps: int) -> list[float]:
    from chatglm_core.backends import llamacpp

    b = llamacpp.LlamaCppBackend.from_settings(load_settings(device="cpu", backend="llamacpp", gguf_weights=mode))
    seqs = [b.seqs.acquire([], reuse=False)[0] for _ in range(8)]
    for seq in seqs:
        b.run([(1, p, seq, False) for p in range(40)])
    out = []
    for n in ROWS:
        times = []
        for i in range(steps):
            t = time.perf_counter()
            b.run([(2, 40 + i, seq, True) for seq in seqs[:n]])
            times.append(time.perf_counter() - t)
        for seq in seqs:  # back to the 40 prefilled tokens
            b._ll.llama_memory_seq_rm(b._memory, seq, 40, -1)
        out.append(statistics.median(times))
    b.close()
    return out


def transformers_steps(steps: int) -> list[float]:
    import torch
    from transformers import DynamicCache

    from chatglm_core.backends.transformers_backend import TransformersBackend

    model = TransformersBackend.from_settings(load_settings(device="cpu", backend="transformers")).model
    out = []
    with torch.inference_mode():
        for n in ROWS:
            cache = DynamicCache()
            model(input_ids=torch.ones(n, 40, dtype=torch.long), past_key_values=cache, use_cache=True)
            ids = torch.full((n, 1), 2)
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                model(input_ids=ids, past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - t)
            out.append(statistics.median(times))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    from chatglm_core.models.loader import cpu_threads

    print(f"{cpu_threads(load_settings())} thread(s) per step (CHATGLM_THREADS); ms per step and rows/s (ceiling)")
    print(f"  {'':<28}" + "".join(f"{n} row{'s' if n > 1 else ' '}{'':<14}" for n in ROWS))
    for name, times in [(f"llama.cpp {m}", llama_steps(m, args.steps)) for m in ("float16", "native", "bfloat16")] + \
            [("transformers float32", transformers_steps(args.steps))]:
        print(f"  {name:<28}" + "".join(f"{t * 1000:6.1f} ms {n / t:5.0f}/s   " for n, t in zip(ROWS, times, strict=True)),
              flush=True)


if __name__ == "__main__":
    main()
