"""The prompt (prefix) cache: the next turn of a ~1.5k-token chat with the cache on and off.

    python benchmarks/bench_prefix_cache.py [--backends llamacpp,transformers] [--runs 3] [--tokens 1500]

Per backend (the embedded SmolLM2; CHATGLM_THREADS as set), interleaved runs of:
1. the conversation's first turn from an empty cache: cold prefill, time to first token;
2. its next turn (the reply appended, one more question) with the cache as turn 1 left it ("on")
   and, right after, the same turn with the cache cleared ("off"): time to first token and the
   prompt tokens reused (usage.cached_tokens);
3. once: a tool-mode agent round after the first (a forced calculator call, then the answer): the
   prompt tokens the second round reused.
Medians; speed is reported here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatglm_core.backends import load_backend  # noqa: E402
from chatglm_core.backends.base import GenerationOptions  # noqa: E402
from chatglm_core.engine import Engine  # noqa: E402
from chatglm_core.messages import Done, Message, Role  # noqa: E402
from chatglm_core.settings import load_settings  # noqa: E402

from bench_perf import off_main  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

OPTIONS = GenerationOptions(temperature=0, max_new_tokens=8)
TOPICS = ["the history of lighthouses", "how tides work", "the life of a ship's navigator", "storms at sea",
          "the first maps of the coast", "how fishermen read the weather", "old harbour towns",
          "the keeper's daily routine", "signals between ships", "why lighthouses were automated"]


def reply_about(topic: str, i: int) -> str:
    return " ".join(f"Point {i}.{k}: when people ask about {topic}, the answer depends on the season, the coast "
                    f"and the tools of the time, and each generation told it a little differently." for k in range(6))


def conversation(backend, tokens: int) -> list[Message]:
    """User/assistant turns about TOPICS until the prompt is about `tokens` tokens, ending with a question."""
    convo: list[Message] = []
    for i in range(100):
        topic = TOPICS[i % len(TOPICS)]
        ask = [*convo, Message(Role.USER, f"Tell me about {topic}.")]
        if backend.count_tokens(ask) >= tokens:
            return ask
        convo = [*ask, Message(Role.ASSISTANT, reply_about(topic, i))]
    raise AssertionError("unreachable")


@off_main
def first_token(engine: Engine, messages: list[Message]) -> tuple[float, Done]:
    start, first, done = time.perf_counter(), None, None
    for ev in engine.stream(messages, OPTIONS):
        first = first or time.perf_counter() - start
        if isinstance(ev, Done):
            done = ev
    return first, done


def chat_turns(backend, engine: Engine, args) -> None:
    convo = conversation(backend, args.tokens)
    cold, on, off, cached = [], [], [], []
    for _ in range(args.runs):
        backend.clear_prefix_cache()
        t, done = first_token(engine, convo)
        cold.append(t)
        turn2 = [*convo, done.message, Message(Role.USER, "Thanks. Now summarise all of that in one line.")]
        t, done2 = first_token(engine, turn2)
        on.append(t)
        cached.append(done2.usage.cached_tokens)
        backend.clear_prefix_cache()
        t, done3 = first_token(engine, turn2)
        off.append(t)
        assert done3.usage.cached_tokens == 0 and done3.message.content == done2.message.content, \
            "a cached prefix changed the reply"
    med = statistics.median
    print(f"  first turn, {done.usage.prompt_tokens} prompt tokens (cold prefill): first token {med(cold):.3f} s")
    print(f"  next turn, {done2.usage.prompt_tokens} prompt tokens: first token {med(on):.3f} s with the cache "
          f"({med(cached):.0f} tokens reused), {med(off):.3f} s without ({med(off) / med(on):.1f}x)", flush=True)


@off_main
def agent_round(engine: Engine) -> list[Done]:
    from chatglm_core.agent import run_agent
    from tools.builtins import calculator
    from tools.registry import ToolRegistry

    registry = ToolRegistry()
    registry.register(calculator)
    question = [Message(Role.USER, "What is 37 * 43? Use the calculator.")]
    events = run_agent(engine, question, registry=registry, options=GenerationOptions(temperature=0, max_new_tokens=80),
                       tool_choice="required", max_rounds=2)
    return [ev for ev in events if isinstance(ev, Done)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="llamacpp,transformers")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1450)
    parser.add_argument("--data-dir", default="/tmp/chatglm-test-data")
    args = parser.parse_args()
    for name in args.backends.split(","):
        settings = load_settings(data_dir=Path(args.data_dir), model_path=None, device="cpu", backend=name)
        backend = load_backend(settings)
        engine = Engine(backend)
        threads = getattr(backend, "n_threads", None) or __import__("torch").get_num_threads()
        print(f"{name} ({backend.model_name}, {threads} threads)", flush=True)
        chat_turns(backend, engine, args)
        rounds = agent_round(engine)
        print("  tool-mode agent: " + "; ".join(
            f"round {i + 1} {d.finish_reason}, {d.usage.prompt_tokens} prompt tokens, {d.usage.cached_tokens} cached"
            for i, d in enumerate(rounds)), flush=True)
        engine.shutdown()
        if hasattr(backend, "close"):
            backend.close()


if __name__ == "__main__":
    main()
