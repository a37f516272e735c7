"""The API's sampling defaults on the embedded model: how often a request that sets no sampling option
gets the right answer, beside the same request with each candidate repetition penalty set.

    python benchmarks/bench_api_defaults.py [--n 30] [--max-tokens 64] [--backend auto]

Requests go through the real app (`create_app`, in-process HTTP via Starlette's TestClient) with only
`model`, `messages` and `max_tokens`; 8 at a time (the engine batches them). "defaults" is what the
API applies now; the other rows send `repetition_penalty` explicitly. An answer counts as right when
it contains "Paris". JSON-mode rows check that `response_format` replies stay valid objects.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatglm_core.api.app import create_app  # noqa: E402
from chatglm_core.backends import load_backend  # noqa: E402
from chatglm_core.engine import Engine  # noqa: E402
from chatglm_core.settings import load_settings  # noqa: E402

QUESTION = "What is the capital of France?"
JSON_QUESTION = "Give the capital of France as JSON with keys country and capital."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    from starlette.testclient import TestClient

    settings = load_settings(device="cpu", backend=args.backend)
    engine = Engine(load_backend(settings))
    client = TestClient(create_app(settings, engine))
    model = client.get("/v1/models").json()["data"][0]["id"]
    print(f"{engine.model_name} on {getattr(engine.backend, 'runtime', engine.backend.device)}; "
          f"{args.n} requests each, max_tokens {args.max_tokens}")

    def ask(extra: dict, question: str = QUESTION) -> dict:
        body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": args.max_tokens,
                **extra}
        r = client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]

    with ThreadPoolExecutor(8) as pool:
        for label, extra in (("defaults", {}), ("penalty 1.0", {"repetition_penalty": 1.0}),
                             ("penalty 1.05", {"repetition_penalty": 1.05})):
            answers = list(pool.map(lambda _: ask(extra)["content"] or "", range(args.n)))
            right = sum("paris" in a.lower() for a in answers)
            print(f"  {label:<13} {right}/{args.n} say Paris", flush=True)
        for label, extra in (("defaults", {}), ("penalty 1.0", {"repetition_penalty": 1.0}),
                             ("penalty 1.05", {"repetition_penalty": 1.05})):
            fmt = {"response_format": {"type": "json_object"}, **extra}
            replies = list(pool.map(lambda _: ask(fmt, JSON_QUESTION)["content"] or "", range(args.n)))
            valid = sum(_is_object(r) for r in replies)
            print(f"  json_object, {label:<13} {valid}/{args.n} valid JSON objects", flush=True)


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


if __name__ == "__main__":
    main()
