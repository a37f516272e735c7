"""What llama.cpp computes a GGUF with (`CHATGLM_GGUF_WEIGHTS`): speed against answer quality.

    python benchmarks/bench_gguf_weights.py [--tokens 64] [--runs 3]

For each mode (native, float16, bfloat16) on the embedded SmolLM2: the file's size, single-stream
greedy decode tok/s (median of runs), and, teacher-forced over the float32 reference's own greedy
continuations of 12 prompts, how often llama.cpp's next token is the reference's (top-1 agreement)
and the mean KL divergence of its distribution from the reference's. The reference is the
transformers backend: the GGUF's weights dequantized to float32, computed in float32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_perf import STORY, greedy, timed_stream  # noqa: E402

from chatglm_core.messages import Message, Role  # noqa: E402
from chatglm_core.settings import load_settings  # noqa: E402

PROMPTS = ["What is the capital of France?", "What is 2 + 3?", "Name three primary colors.",
           "Who wrote Romeo and Juliet?", "Translate 'good morning' into Spanish.",
           "What is the boiling point of water in Celsius?", "Write a haiku about the sea.",
           "What is the largest planet in the solar system?", "Explain how rain forms.",
           "Write a short poem about autumn leaves.", "List three uses of Python.", "What is photosynthesis?"]


def references(settings, n: int):
    """(prompt + reference continuation ids, prompt length, reference log-probs per generated position)."""
    import torch

    from chatglm_core.backends.transformers_backend import TransformersBackend

    ref = TransformersBackend.from_settings(settings.model_copy(update={"backend": "transformers"}))
    out = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = ref.prompt_ids([Message(Role.USER, p)])
            full = ref.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0].tolist()
            logits = ref.model(torch.tensor([full])).logits[0, len(ids) - 1:-1].float()
            out.append((full, len(ids), torch.log_softmax(logits, -1)))
    return out


def agreement(backend, refs) -> tuple[float, float, int]:
    import torch

    agree, kl, total = 0, 0.0, 0
    for full, plen, ref_logp in refs:
        logits = torch.stack(backend.teacher_forced_logits(full[:-1], plen - 1))
        logp = torch.log_softmax(logits.float(), -1)
        agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        kl += float(torch.nn.functional.kl_div(logp, ref_logp, log_target=True, reduction="sum"))
        total += len(ref_logp)
    return agree / total, kl / total, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--data-dir", default=os.environ.get("CHATGLM_DATA_DIR", "data"))
    args = ap.parse_args()
    from chatglm_core.backends import llamacpp

    if not llamacpp.available():
        sys.exit("llama-cpp-python is not installed (`make setup` builds it)")
    settings = load_settings(data_dir=Path(args.data_dir).resolve(), device="cpu", model_path=None, backend="llamacpp")
    refs = references(settings, args.tokens)
    print(f"{'mode':<10} {'file':>9} {'decode':>12} {'top-1 agreement':>16} {'mean KL':>9}   "
          f"(teacher-forced, {len(PROMPTS)} prompts x {args.tokens} tokens of the float32 reference)")
    for mode in ("native", "float16", "bfloat16"):
        backend = llamacpp.LlamaCppBackend.from_settings(settings.model_copy(update={"gguf_weights": mode}))
        try:
            timed_stream(backend.stream, STORY, greedy(8))
            rate = statistics.median(timed_stream(backend.stream, STORY, greedy(args.tokens))[1]
                                     for _ in range(args.runs))
            top1, kl, n = agreement(backend, refs)
            print(f"{mode:<10} {backend.gguf.stat().st_size / 1e6:6.0f} MB {rate:7.1f} tok/s {top1:15.2%} "
                  f"{kl:9.5f}   ({n} positions)", flush=True)
        finally:
            backend.close()


if __name__ == "__main__":
    main()
