"""Forced tool calls and JSON mode through the API with the real model.

These need grammar-constrained decoding (chatglm_core.constrain): the tiny model never calls a
tool or writes schema-valid JSON reliably on its own, the grammar makes it.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from chatglm_core.constrain import logits_processor  # noqa: F401  (these tests need it)
from test_api import KEY, MODEL, WEATHER, start_server, stop_server

from chatglm_core.backends.base import Constraint, GenerationOptions
from chatglm_core.messages import Message, Role

QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCE = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--api-key", KEY)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_forced_tool_call_round_trip(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice=FORCE,
                                       temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages = QUESTION + [choice.message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=12)
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason in ("stop", "length")


def test_an_agent_round_after_the_first_reuses_the_cached_prompt(client):
    """Tool mode: the round that sends the tool's result begins with the previous round's prompt
    (tool list included) and call, so those tokens come from the prefix cache."""
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_tokens=40)
    call = r.choices[0].message.tool_calls[0]
    messages = QUESTION + [r.choices[0].message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'}]
    again = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=8)
    assert r.usage.prompt_tokens <= again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens


def test_required_tool_call_streams_as_tool_call_deltas(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER],
                                                 tool_choice="required", temperature=0, max_tokens=40, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather"
    jsonschema.validate(json.loads(deltas[0].function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "<tool_call>" not in "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def test_legacy_forced_function_call(server):
    body = {"model": "chatglm3-6b", "messages": QUESTION, "functions": [WEATHER["function"]],
            "function_call": {"name": "get_weather"}, "temperature": 0, "max_tokens": 40}
    r = httpx.post(server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=120).json()
    assert r["choices"][0]["finish_reason"] == "function_call"
    assert r["choices"][0]["message"]["function_call"]["name"] == "get_weather"
    json.loads(r["choices"][0]["message"]["function_call"]["arguments"])


def test_auto_tool_choice_may_answer_in_text(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                       tools=[WEATHER], temperature=0, max_tokens=8)
    choice = r.choices[0]
    if choice.message.tool_calls:  # a call, if made, is well-formed
        jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments),
                            WEATHER["function"]["parameters"])
    else:
        assert choice.message.content and "<tool_call>" not in choice.message.content


# Bounded fields only: under a grammar the tiny model happily writes an integer of endless 1s.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country", "is_capital"],
          "properties": {"city": {"type": "string"}, "country": {"type": "string"}, "is_capital": {"type": "boolean"}}}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_yields_valid_json(client, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "Describe Paris as JSON."}],
          "response_format": fmt, "temperature": 0, "max_tokens": 60}
    if stream:
        text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(**kw, stream=True)
                       if ch.choices)
    else:
        text = client.chat.completions.create(**kw).choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)


def test_response_format_json_object(client):
    ask = "Reply with a JSON object whose only key is \"city\", set to \"Paris\"."
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ask}],
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=60)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content  # not cut off by max_tokens
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_remote_backend_forwards_a_forced_tool_call(server):
    from chatglm_core.backends.remote import RemoteBackend
    from chatglm_core.engine import Engine
    from chatglm_core.settings import load_settings

    engine = Engine(RemoteBackend.from_settings(load_settings(remote_base_url=server + "/v1", remote_api_key=KEY)))
    options = GenerationOptions(max_new_tokens=40, temperature=0,
                                constraint=Constraint("tool_call", tools=(WEATHER,), tool_name="get_weather"))
    done = engine.complete([Message(Role.USER, "What is the weather in Paris?")], options, tools=[WEATHER])
    assert done.finish_reason == "tool_calls" and done.message.tool_calls[0].name == "get_weather"
    jsonschema.validate(done.message.tool_calls[0].arguments, WEATHER["function"]["parameters"])


def test_a_forced_call_cut_by_max_tokens_is_length_without_half_a_call(client):
    """As OpenAI answers: finish_reason "length" and no `<tool_call>{...` markup posing as content."""
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice=FORCE,
                                       temperature=0, max_tokens=6)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content is None
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice=FORCE,
                                                 temperature=0, max_tokens=6, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert not any(ch.choices[0].delta.tool_calls for ch in chunks if ch.choices)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ""
