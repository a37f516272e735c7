"""The prompt (prefix) cache: the next turn of a ~1.5k-token chat with the cache on and off.

    python benchmarks/bench_prefix_cache.py [--backends llamacpp,transformers] [--runs 3] [--tokens 1500]
    python benchmarks/bench_prefix_cache.py --backends transformers --device cuda --synthetic-chatglm3 DIR

Per backend (the embedded SmolLM2, or --model-path; CHATGLM_THREADS as set), interleaved runs of:
1. the conversation's first turn from an empty cache: cold prefill, time to first token (the time to
   the Done of a one-token generation, whatever that token's text);
2. its next turn (the reply appended, one more question) with the cache as turn 1 left it ("on")
   and, right after, the same turn with the cache cleared ("off"): time to first token and the
   prompt tokens reused (usage.cached_tokens);
3. once: a tool-mode agent round after the first (a forced calculator call, then the answer): the
   prompt tokens the second round reused.
Medians; speed is reported here, never asserted in tests.

--synthetic-chatglm3 DIR writes (once) a ChatGLM3-6B-size checkpoint with random weights into DIR
(ChatGLM3-6B's config.json and state-dict names, 12.5 GB of float16 safetensors shards, the test fixture's
tokenizer) and measures it through the real ChatGLM3 loading path: a 6B model's prefill time on a GPU
does not depend on the weights' values, and no hub is reachable to fetch the real ones.
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

# Timed turns generate one token, so the time to their Done is the time to the first token whatever
# its text (a random-weight model's first tokens often decode to no text at all); the replies
# compared for identity are 8 tokens.
FIRST = GenerationOptions(temperature=0, max_new_tokens=1)
REPLY = GenerationOptions(temperature=0, max_new_tokens=8)
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
def generate(engine: Engine, messages: list[Message], options: GenerationOptions) -> tuple[float, Done]:
    """(seconds to the Done, the Done)."""
    start = time.perf_counter()
    done = [ev for ev in engine.stream(messages, options) if isinstance(ev, Done)][-1]
    return time.perf_counter() - start, done


def chat_turns(backend, engine: Engine, args) -> None:
    convo = conversation(backend, args.tokens)
    cold, on, off, cached, same = [], [], [], [], 0
    for _ in range(args.runs):
        backend.clear_prefix_cache()
        t, done = generate(engine, convo, FIRST)
        cold.append(t)
        _, done = generate(engine, convo, REPLY)  # the reply the next turn carries (and caches)
        turn2 = [*convo, done.message, Message(Role.USER, "Thanks. Now summarise all of that in one line.")]
        t, done2 = generate(engine, turn2, FIRST)
        on.append(t)
        cached.append(done2.usage.cached_tokens)
        backend.clear_prefix_cache()
        t, done3 = generate(engine, turn2, FIRST)
        off.append(t)
        assert done3.usage.cached_tokens == 0, "clear_prefix_cache() left a cached prefix"
        backend.clear_prefix_cache()
        _, cold_reply = generate(engine, turn2, REPLY)
        _, warm_reply = generate(engine, turn2, REPLY)  # all but the last prompt token from the cache
        assert warm_reply.usage.cached_tokens > 0, "the repeated prompt was not cached"
        same += cold_reply.message.content == warm_reply.message.content
    med = statistics.median
    print(f"  first turn, {done.usage.prompt_tokens} prompt tokens (cold prefill): first token {med(cold):.3f} s")
    print(f"  next turn, {done2.usage.prompt_tokens} prompt tokens: first token {med(on):.3f} s with the cache "
          f"({med(cached):.0f} tokens reused), {med(off):.3f} s without ({med(off) / med(on):.1f}x); "
          f"{REPLY.max_new_tokens}-token greedy reply from a cached prompt identical to the cold one in "
          f"{same} of {args.runs} runs", flush=True)


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


def synthetic_chatglm3(folder: Path) -> str:
    """A ChatGLM3-6B-size random-weight checkpoint in `folder` (written on the first call)."""
    from chatglm3_memory import CHATGLM3_6B, make_checkpoint

    if not (folder / "model.safetensors.index.json").is_file():
        import torch

        start = time.perf_counter()
        size = make_checkpoint(folder, CHATGLM3_6B, shards=7, device="cuda" if torch.cuda.is_available() else "cpu",
                               fmt="safetensors")
        took = time.perf_counter() - start
        print(f"wrote a {size / 1e9:.1f} GB random-weight ChatGLM3-6B checkpoint in {took:.0f} s", flush=True)
    return str(folder)


def where(backend) -> str:
    """'N threads' on the CPU, the GPU's name on CUDA."""
    model = getattr(backend, "model", None)
    device = getattr(model, "device", None)
    if device is not None and device.type == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(device)}, {model.dtype}"
    threads = getattr(backend, "n_threads", None) or __import__("torch").get_num_threads()
    return f"{threads} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="llamacpp,transformers")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1450)
    parser.add_argument("--data-dir", default="/tmp/chatglm-test-data")
    parser.add_argument("--model-path", default=None, help="a model folder or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto (the transformers backend)")
    parser.add_argument("--synthetic-chatglm3", metavar="DIR", default=None,
                        help="measure a ChatGLM3-6B-size checkpoint with random weights, written into DIR once")
    parser.add_argument("--no-agent", action="store_true", help="skip the tool-mode round")
    args = parser.parse_args()
    if args.synthetic_chatglm3:
        args.model_path = synthetic_chatglm3(Path(args.synthetic_chatglm3))
    for name in args.backends.split(","):
        settings = load_settings(data_dir=Path(args.data_dir), model_path=args.model_path, device=args.device,
                                 backend=name)
        start = time.perf_counter()
        backend = load_backend(settings)
        engine = Engine(backend)
        print(f"{name} ({backend.model_name}, {where(backend)}; loaded in {time.perf_counter() - start:.1f} s)",
              flush=True)
        chat_turns(backend, engine, args)
        if args.no_agent:
            engine.shutdown()
            continue
        rounds = agent_round(engine)
        print("  tool-mode agent: " + "; ".join(
            f"round {i + 1} {d.finish_reason}, {d.usage.prompt_tokens} prompt tokens, {d.usage.cached_tokens} cached"
            for i, d in enumerate(rounds)), flush=True)
        engine.shutdown()
        if hasattr(backend, "close"):
            backend.close()


if __name__ == "__main__":
    main()
