"""Sampling defaults on the embedded model: how often a sampled answer is right at our generic
fallback (temperature 0.7, top_p 0.9) and at the model card's recommendation (0.2, 0.9), which is
what `chatglm_core.sampling` now applies when you set nothing.

    python benchmarks/bench_sampling.py [--seeds 20]

Each question is asked once per seed at each setting (repetition penalty 1.05, the app's default);
an answer counts as right when it contains the expected word.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatglm_core.backends import load_backend  # noqa: E402
from chatglm_core.chat import options_from  # noqa: E402
from chatglm_core.engine import Engine  # noqa: E402
from chatglm_core.messages import Message, Role  # noqa: E402
from chatglm_core.settings import load_settings  # noqa: E402

QUESTIONS = [("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
             ("How many days are in a week?", "seven|7"), ("What color is the sky on a clear day?", "blue"),
             ("Who wrote Romeo and Juliet?", "Shakespeare")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    settings = load_settings(device="cpu")
    engine = Engine(load_backend(settings))
    model = options_from(settings, engine.backend)
    print(f"{engine.model_name} on {getattr(engine.backend, 'runtime', engine.backend.device)}; "
          f"defaults now: {engine.backend.sampling.describe()}")
    for label, temperature, top_p in (("fallback", 0.7, 0.9), ("model card", model.temperature, model.top_p)):
        right = total = 0
        for question, expected in QUESTIONS:
            for seed in range(args.seeds):
                opts = options_from(settings, engine.backend, temperature=temperature, top_p=top_p, seed=seed,
                                    max_new_tokens=48, repetition_penalty=1.05)
                text = engine.complete([Message(Role.USER, question)], opts).message.content.lower()
                right += any(w.lower() in text for w in expected.split("|"))
                total += 1
        print(f"  {label:<10} temperature {temperature:g}, top_p {top_p:g}: {right}/{total} right "
              f"({100 * right / total:.0f} %)", flush=True)


if __name__ == "__main__":
    main()
