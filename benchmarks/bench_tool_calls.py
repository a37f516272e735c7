"""Schema-valid tool-call rate on the embedded SmolLM2, with and without constrained decoding.

For each tool (schemas with enums, numbers, booleans, arrays, nested objects, optional fields)
the model gets N requests that call for it, with the tool described in the prompt and the
instruction to answer with a <tool_call>. A reply counts as valid when our parser finds a call of
that tool and its arguments pass jsonschema validation. Sampling with our generic fallbacks
(temperature 0.7, top_p 0.9, repetition penalty 1.05; the embedded model's own card says 0.2, which
the app now uses, so this is the harder case).

    python benchmarks/bench_tool_calls.py [--n 5] [--max-new-tokens 96] [--seed 0] [--set tuned|unseen|calculator]

`--set unseen` runs four schemas the constraints were not tuned on (`--max-new-tokens 120`, as
measured in the README), `--set calculator` forced calls of the built-in calculator on arithmetic
questions. Besides "valid" each row counts "sensible" calls: valid, every string argument non-empty
and free of markup (`<`, `{`, `}`) and of the tool's own name (a model looping inside a string
repeats it), and for the calculator an expression that evaluates to the right number.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jsonschema


def tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    params = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


CASES: list[tuple[dict[str, Any], list[str]]] = [
    (tool("set_thermostat", "Set the heating mode of a room.",
          {"room": {"type": "string", "enum": ["kitchen", "bedroom", "office"]},
           "mode": {"type": "string", "enum": ["heat", "cool", "off"]}}, ["room", "mode"]),
     ["Turn on the heating in the kitchen.", "Cool down the bedroom please.", "Switch the office heating off.",
      "Make the kitchen cooler.", "Heat the bedroom.", "The office is cold, warm it up.",
      "Please turn off the bedroom thermostat.", "Set the kitchen to cool."]),
    (tool("transfer_money", "Send money to an account.",
          {"account_id": {"type": "integer", "minimum": 1}, "amount": {"type": "number", "minimum": 0}},
          ["account_id", "amount"]),
     ["Send 25.50 euros to account 1234.", "Transfer 100 to account 42.", "Pay 9.99 to account 7.",
      "Move 3000 dollars to account 555.", "Give account 88 the amount 12.75.", "Wire 60 to account 31.",
      "Send 1.5 to account 900.", "Transfer 250 to account 12."]),
    (tool("set_alarm", "Set or clear an alarm.",
          {"hour": {"type": "integer", "minimum": 0, "maximum": 23}, "enabled": {"type": "boolean"},
           "label": {"type": "string"}}, ["hour", "enabled"]),
     ["Wake me up at 7.", "Disable my 6 o'clock alarm.", "Set an alarm for 22 labelled 'sleep'.",
      "Turn off the alarm at 9.", "Alarm at 5 please.", "Set an alarm for 13, label it lunch.",
      "Cancel the 8 o'clock alarm.", "I need an alarm at 6."]),
    (tool("add_to_shopping_list", "Add items to the shopping list.",
          {"items": {"type": "array", "items": {"type": "string"}, "minItems": 1}}, ["items"]),
     ["Add milk and eggs to my shopping list.", "I need bread.", "Put apples, pears and plums on the list.",
      "We are out of coffee and sugar.", "Add rice to the shopping list.", "Remember to buy soap and shampoo.",
      "Add tomatoes.", "Put cheese and butter on the list."]),
    (tool("book_flight", "Book a flight for a passenger.",
          {"passenger": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                         "required": ["name", "age"]},
           "route": {"type": "object", "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
                     "required": ["from", "to"]}}, ["passenger", "route"]),
     ["Book a flight for Alice, 34, from Paris to Rome.", "Bob (age 50) flies from Berlin to Oslo.",
      "Get Carla, 8 years old, a flight from Madrid to Lisbon.", "Fly Dan, 41, from Tokyo to Seoul.",
      "Book Eve, 29, on a flight London to Dublin.", "A flight for Frank, 62, from Cairo to Athens.",
      "Grace is 19 and needs a flight from Vienna to Prague.", "Book Hans, 45, from Zurich to Milan."]),
]


UNSEEN: list[tuple[dict[str, Any], list[str]]] = [
    (tool("find_flights", "Find flights between two cities on a date.",
          {"origin": {"type": "string"}, "destination": {"type": "string"}, "date": {"type": "string"}},
          ["origin", "destination", "date"]),
     ["Find me a flight from Paris to Rome on May 3.", "Flights from Berlin to Oslo tomorrow?",
      "I need to fly Madrid to Lisbon on 2025-07-14.", "Any flights Tokyo to Seoul next Friday?",
      "Search flights London to Dublin for June 1.", "Cairo to Athens on the 12th, please.",
      "Show flights from Vienna to Prague on Monday.", "Flights Zurich to Milan, December 24."]),
    (tool("send_email", "Send an email.",
          {"to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}},
          ["to", "subject", "body"]),
     ["Email bob@example.com that the meeting moved to 3pm.", "Tell alice@example.org thanks for the cake.",
      "Send carol@example.com the subject 'Invoice' and say it is attached.",
      "Write to dan@example.net: lunch on Friday?", "Email eve@example.com: the server is down.",
      "Let frank@example.com know the report is ready.", "Mail grace@example.org happy birthday.",
      "Send hans@example.com a reminder about rent."]),
    (tool("search_recipes", "Search recipes.",
          {"query": {"type": "string"}, "max_minutes": {"type": "integer", "minimum": 1},
           "vegetarian": {"type": "boolean"}}, ["query"]),
     ["Find a vegetarian lasagne recipe.", "Quick chicken curry under 30 minutes.", "Recipes for pancakes.",
      "A vegan chili I can make in 45 minutes.", "How do I make tomato soup?", "Find a chocolate cake recipe.",
      "Vegetarian burgers in under 20 minutes.", "Show me risotto recipes."]),
    (tool("create_reminder", "Create a reminder.",
          {"text": {"type": "string"}, "when": {"type": "string"},
           "priority": {"type": "string", "enum": ["low", "normal", "high"]}}, ["text", "when"]),
     ["Remind me to call mum at 6pm.", "Remind me tomorrow morning to buy milk, it's important.",
      "Set a reminder for Friday: pay the rent.", "Remind me in an hour to stretch.",
      "Don't let me forget the dentist on Tuesday at 9.", "Remind me tonight to water the plants.",
      "High priority: submit the report by noon.", "Remind me on Sunday to call grandma."]),
]

#: Forced calls of the built-in calculator, and the value a sensible expression gives.
CALCULATOR_PROMPTS = [("What is 17 times 23?", 391), ("Compute (3 + 4) * 5.", 35),
                      ("What is 2 to the power of 10?", 1024),
                      ("Divide 100 by 8.", 12.5), ("Add 1234 and 4321.", 5555), ("What is 7 minus 19?", -12),
                      ("What is the square root of 144?", 12), ("How much is 15% of 240?", 36)]


def calculator_case() -> tuple[dict[str, Any], list[str]]:
    from tools.builtins import register_builtins
    from tools.registry import ToolRegistry

    registry = ToolRegistry()
    register_builtins(registry)
    return registry.get("calculator").spec(), [p for p, _ in CALCULATOR_PROMPTS]


def parsed_call(text: str, spec: dict[str, Any], parse: Any) -> dict[str, Any] | None:
    """The call's arguments when `text` is one schema-valid call of `spec`, else None."""
    from chatglm_core.errors import ParseError

    try:
        message = parse(text, tools=True)
    except ParseError:
        return None
    fn = spec["function"]
    if len(message.tool_calls) != 1 or message.tool_calls[0].name != fn["name"]:
        return None
    args = message.tool_calls[0].arguments
    return args if jsonschema.Draft202012Validator(fn["parameters"]).is_valid(args) else None


def is_valid_call(text: str, spec: dict[str, Any], parse: Any) -> bool:
    return parsed_call(text, spec, parse) is not None


def is_sensible(args: dict[str, Any] | None, spec: dict[str, Any], expected: float | None = None) -> bool:
    if args is None:
        return False
    name = spec["function"]["name"]
    strings = list(_strings(args))
    if any(not s.strip() or any(c in s for c in "<{}") or name in s for s in strings):
        return False
    if expected is None:
        return True
    from tools.calculator import evaluate

    try:
        return abs(float(evaluate(args["expression"])) - expected) < 1e-6
    except Exception:  # noqa: BLE001 - an expression the calculator refuses is not sensible
        return False


def _strings(value: Any) -> Any:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def generate_batch(backend: Any, spec: dict[str, Any], prompts: list[str], *, constrained: bool,
                   max_new_tokens: int, seed: int) -> list[str]:
    """One batched, sampled `model.generate` over the prompts (left-padded)."""
    import torch
    from transformers import LogitsProcessorList

    from chatglm_core.backends.base import Constraint
    from chatglm_core.constrain import logits_processor
    from chatglm_core.messages import Message, Role

    tok = backend.tokenizer
    ids = [backend.format.encode([Message(Role.USER, p)], [spec]) for p in prompts]
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    procs = LogitsProcessorList()
    if constrained:
        procs.append(logits_processor(Constraint("tool_call", tools=(spec,)), tok, backend.format.name))
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = backend.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=0.7,
                                     top_p=0.9, repetition_penalty=1.05, max_new_tokens=max_new_tokens, logits_processor=procs,
                                     eos_token_id=backend.format.stop_token_ids, pad_token_id=pad)
    return [tok.decode(row[width:], skip_special_tokens=True) for row in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="prompts per schema (at most 8)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", choices=["tuned", "unseen", "calculator"], default="tuned",
                    help="tuned: the five schemas above; unseen: four others; calculator: forced calculator calls")
    ap.add_argument("--show", action="store_true", help="print every reply")
    ap.add_argument("--constrained-only", action="store_true", help="skip the unconstrained baseline")
    args = ap.parse_args()

    from chatglm_core.backends.transformers_backend import TransformersBackend
    from chatglm_core.settings import load_settings

    backend = TransformersBackend.from_settings(load_settings(device="cpu", backend="transformers"))
    cases = {"tuned": CASES, "unseen": UNSEEN, "calculator": [calculator_case()]}[args.set]
    expected = {p: v for p, v in CALCULATOR_PROMPTS} if args.set == "calculator" else {}
    totals = {False: [0, 0, 0], True: [0, 0, 0]}  # valid, sensible, total
    print(f"model: {backend.model_name}  set: {args.set}  prompts/schema: {args.n}  "
          f"max_new_tokens: {args.max_new_tokens}")
    print(f"{'tool':24} {'unconstrained':>14} {'constrained':>12} {'sensible u/c':>13} {'time c/u (s)':>14}")
    for spec, prompts in cases:
        row, sensible, secs = [], [], []
        prompts = prompts[: args.n]
        for constrained in (True,) if args.constrained_only else (False, True):
            start = time.perf_counter()
            texts = generate_batch(backend, spec, prompts, constrained=constrained,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed)
            secs.append(time.perf_counter() - start)
            calls = [parsed_call(t, spec, backend.format.parse) for t in texts]
            good = [is_sensible(c, spec, expected.get(p)) for c, p in zip(calls, prompts)]
            if args.show:
                for text, call, ok in zip(texts, calls, good):
                    mark = "ok " if ok else ("val" if call is not None else "BAD")
                    print(f"  {mark} {'c' if constrained else 'u'} {text[:160]!r}")
            ok = sum(c is not None for c in calls)
            totals[constrained][0] += ok
            totals[constrained][1] += sum(good)
            totals[constrained][2] += len(texts)
            row.append(f"{ok}/{len(texts)}")
            sensible.append(str(sum(good)))
        if args.constrained_only:
            row, sensible, secs = ["-", *row], ["-", *sensible], [0.0, *secs]
        print(f"{spec['function']['name']:24} {row[0]:>14} {row[1]:>12} {'/'.join(sensible):>13} "
              f"{secs[1]:>6.1f}/{secs[0]:<6.1f}")
    for constrained in (True,) if args.constrained_only else (False, True):
        ok, good, n = totals[constrained]
        print(f"{'constrained' if constrained else 'unconstrained'}: {ok}/{n} schema-valid = {100 * ok / n:.0f}%, "
              f"{good}/{n} sensible = {100 * good / n:.0f}%")


if __name__ == "__main__":
    main()
