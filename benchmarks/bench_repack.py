"""Does llama.cpp's weight repacking (its "extra" buffer types) pay on this CPU?

For the quantized formats users run (Q4_0, Q4_K_M, Q8_0, plus the embedded file's own Q4_1), made
from the embedded SmolLM2 with llama.cpp's own quantizer, this decodes with `use_extra_bufts` on and
off, interleaved, and prints prompt (prefill) and decode tokens/s for each, with the ratio. It is the
measurement behind `CHATGLM_LLAMA_REPACK=auto` (backends.llamacpp.use_extra_buffers): off on AMX
CPUs, where the repacked path crashes, on elsewhere. Do not run it with "on" on an AMX CPU.

    python benchmarks/bench_repack.py [--threads 1 2] [--runs 3] [--tokens 64] [--prompt 256]
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMATS = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def quantized_files(settings) -> dict[str, Path]:
    """The embedded file itself (Q4_1) and the FORMATS, quantized once from its float16 copy (cached)."""
    import llama_cpp as ll

    from chatglm_core.backends import llamacpp
    from chatglm_core.models.loader import embedded_gguf

    source = embedded_gguf()
    f16 = llamacpp.compute_file(source, settings.model_copy(update={"gguf_weights": "float16"}))
    files = {"Q4_1 (embedded)": source}
    # SmolLM2's 576-wide rows are not a multiple of 256, so llama.cpp warns per tensor while it falls
    # back to Q5_0/Q8_0 for most K-quant tensors: quiet, and said once below
    logging.getLogger("chatglm_core.backends.llamacpp").setLevel(logging.ERROR)
    for name, ftype in FORMATS.items():
        target = f16.with_name(f16.stem.replace("-float16", "") + f"-{name}.gguf")
        if not target.is_file():
            params = ll.llama_model_quantize_default_params()
            params.ftype = getattr(ll, ftype)
            if ll.llama_model_quantize(str(f16).encode(), str(target).encode(), params) != 0:
                raise SystemExit(f"could not quantize to {name}")
        files[name] = target
    return files


def speed(path: Path, extra: bool, threads: int, n_prompt: int, n_gen: int) -> tuple[float, float]:
    """(prompt tok/s, decode tok/s) through llama.cpp's C API, one sequence, greedy-free (token 1s)."""
    import llama_cpp as ll

    from chatglm_core.backends.llamacpp import _load_model

    model = _load_model(path, extra)
    cp = ll.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_prompt + n_gen + 8, 512, 512
    cp.n_threads = cp.n_threads_batch = threads
    ctx = ll.llama_init_from_model(model, cp)
    batch = ll.llama_batch_init(512, 0, 1)
    try:
        def feed(tokens: list[int], start: int) -> None:
            for i, tok in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, start + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, i == len(tokens) - 1
            batch.n_tokens = len(tokens)
            if ll.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed")

        prompt = [(17 * i) % 40000 + 100 for i in range(n_prompt)]
        t0 = time.perf_counter()
        feed(prompt, 0)
        t1 = time.perf_counter()
        for k in range(n_gen):
            feed([(31 * k) % 40000 + 100], n_prompt + k)
            ctypes.cast(ll.llama_get_logits_ith(ctx, 0), ctypes.c_void_p)  # as a real loop reads them
        t2 = time.perf_counter()
        return n_prompt / (t1 - t0), n_gen / (t2 - t1)
    finally:
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        ll.llama_model_free(model)


def main() -> None:
    from chatglm_core.backends.llamacpp import _quiet_native_logs, cpu_flags, use_extra_buffers
    from chatglm_core.settings import load_settings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=256)
    args = ap.parse_args()
    _quiet_native_logs()
    if not use_extra_buffers("auto"):
        raise SystemExit("this CPU reports AMX: llama.cpp's repacked buffers crash here, so only 'off' can run")
    amx = sorted(f for f in cpu_flags() if f.startswith(("amx", "avx512_vnni", "avx2")))
    print(f"CPU flags that matter: {' '.join(amx) or 'none'}; prompt {args.prompt} tokens, decode {args.tokens}, "
          f"{args.runs} interleaved runs, medians")
    files = quantized_files(load_settings())
    print("(Q4_K_M on this 135M model is mostly Q5_0: its rows are 576 wide, K-quants need multiples of 256)")
    print(f"{'format':16} {'threads':>7} | {'prompt tok/s on':>15} {'off':>8} {'on/off':>6} | "
          f"{'decode tok/s on':>15} {'off':>8} {'on/off':>6}")
    for name, path in files.items():
        for threads in args.threads:
            runs = {True: [], False: []}
            for _ in range(args.runs):
                for extra in (True, False):
                    runs[extra].append(speed(path, extra, threads, args.prompt, args.tokens))
            pp = {e: statistics.median(r[0] for r in runs[e]) for e in runs}
            tg = {e: statistics.median(r[1] for r in runs[e]) for e in runs}
            print(f"{name:16} {threads:>7} | {pp[True]:15.1f} {pp[False]:8.1f} {pp[True] / pp[False]:6.2f} | "
                  f"{tg[True]:15.1f} {tg[False]:8.1f} {tg[True] / tg[False]:6.2f}")


if __name__ == "__main__":
    main()
