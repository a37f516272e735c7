"""Schema-valid tool-call rate on the embedded SmolLM2, with and without constrained decoding.

For each tool (schemas with enums, numbers, booleans, arrays, nested objects, optional fields)
the model gets N requests that call for it, with the tool described in the prompt and the
instruction to answer with a <tool_call>. A reply counts as valid when our parser finds a call of
that tool and its arguments pass jsonschema validation. Sampling with our generic fallbacks
(temperature 0.7, top_p 0.9, repetition penalty 1.05; the embedded model's own card says 0.2, which
the app now uses, so this is the harder case).

    python benchmarks/bench_tool_calls.py [--n 5] [--max-new-tokens 96] [--seed 0]
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


def is_valid_call(text: str, spec: dict[str, Any], parse: Any) -> bool:
    from chatglm_core.errors import ParseError

    try:
        message = parse(text, tools=True)
    except ParseError:
        return False
    fn = spec["function"]
    if len(message.tool_calls) != 1 or message.tool_calls[0].name != fn["name"]:
        return False
    return jsonschema.Draft202012Validator(fn["parameters"]).is_valid(message.tool_calls[0].arguments)


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
    ap.add_argument("--show", action="store_true", help="print every reply")
    args = ap.parse_args()

    from chatglm_core.backends.transformers_backend import TransformersBackend
    from chatglm_core.settings import load_settings

    backend = TransformersBackend.from_settings(load_settings(device="cpu", backend="transformers"))
    totals = {False: [0, 0], True: [0, 0]}
    print(f"model: {backend.model_name}  prompts/schema: {args.n}  max_new_tokens: {args.max_new_tokens}")
    print(f"{'tool':24} {'unconstrained':>14} {'constrained':>12} {'time c/u (s)':>14}")
    for spec, prompts in CASES:
        row, secs = [], []
        for constrained in (False, True):
            start = time.perf_counter()
            texts = generate_batch(backend, spec, prompts[: args.n], constrained=constrained,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed)
            secs.append(time.perf_counter() - start)
            valid = [is_valid_call(t, spec, backend.format.parse) for t in texts]
            ok = sum(valid)
            if args.show:
                for text, good in zip(texts, valid):
                    print(f"  {'ok ' if good else 'BAD'} {'c' if constrained else 'u'} {text[:160]!r}")
            totals[constrained][0] += ok
            totals[constrained][1] += len(texts)
            row.append(f"{ok}/{len(texts)}")
        print(f"{spec['function']['name']:24} {row[0]:>14} {row[1]:>12} {secs[1]:>6.1f}/{secs[0]:<6.1f}")
    for constrained in (False, True):
        ok, n = totals[constrained]
        print(f"{'constrained' if constrained else 'unconstrained'}: {ok}/{n} schema-valid = {100 * ok / n:.0f}%")


if __name__ == "__main__":
    main()
