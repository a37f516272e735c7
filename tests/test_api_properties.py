"""Property-based tests of the API's request validation: whatever body a client sends to
/v1/chat/completions or /v1/embeddings, the answer is a 200 or a 4xx in OpenAI's error shape,
never a 5xx or a stream that ends in an error.

The app is the real `create_app` over `AnswerBackend` (it replies to anything), driven in-process
with FastAPI's TestClient. Each property runs EXAMPLES generated bodies (HYPOTHESIS_EXAMPLES).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reliability_support import answer_app, assert_openai_error, sse_payloads

from chatglm_core.api.schemas import ChatCompletion

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "300"))
prop = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])
MODEL = "answer-bot"

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)
names = st.sampled_from(["get_weather", "f", "calc-2", "bad name!", "", "x" * 65]) | st.text(max_size=8)
# JSON Schemas: mostly plausible, some broken
schemas = st.one_of(
    st.just({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    st.fixed_dictionaries({"type": st.sampled_from(["object", "string", "nope", 12, None])},
                          optional={"properties": st.dictionaries(st.text(max_size=5), st.fixed_dictionaries(
                              {"type": st.sampled_from(["string", "integer", "array", "strng"])}), max_size=3) |
                              json_values,
                              "required": st.lists(st.text(max_size=5), max_size=3) | json_values,
                              "additionalProperties": st.booleans() | json_values}),
    st.dictionaries(st.text(max_size=8), json_values, max_size=4),
)
functions = st.fixed_dictionaries({"name": names}, optional={
    "description": st.text(max_size=20) | json_values, "parameters": schemas | json_values, "strict": st.booleans()})
tools = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["function", "function", "code"]),
                                        "function": functions}), max_size=3) | json_values
tool_calls = st.lists(st.fixed_dictionaries({"function": st.fixed_dictionaries(
    {"name": names}, optional={"arguments": st.sampled_from(['{"city": "Paris"}', "{not json", "[1]", ""]) |
                               json_values})}, optional={"id": st.text(max_size=6), "type": st.just("function")}),
    max_size=2)
contents = st.text(max_size=40) | st.none() | st.integers() | st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio"])}, optional={"text": st.text(max_size=10) | scalars}),
    max_size=3)
messages = st.fixed_dictionaries({"role": st.sampled_from(
    ["system", "developer", "user", "user", "user", "assistant", "tool", "function", "observation", "wizard"])},
    optional={"content": contents, "name": st.text(max_size=6) | scalars, "tool_calls": tool_calls | json_values,
              "tool_call_id": st.text(max_size=6) | scalars,
              "function_call": st.fixed_dictionaries({"name": names, "arguments": st.text(max_size=10)})})
# a conversation that is usually valid: optional system, user, maybe an assistant call + tool result
plausible_messages = st.builds(
    lambda system, user, extra: ([system] if system else []) + [user] + extra,
    st.none() | st.builds(lambda t: {"role": "system", "content": t}, st.text(max_size=20)),
    st.builds(lambda t: {"role": "user", "content": t}, st.text(max_size=40)),
    st.just([]) | st.just([{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}, {"role": "tool", "tool_call_id": "c1",
                                                                      "content": "sunny"}]))
tool_choices = st.sampled_from(["none", "auto", "required", "sometimes"]) | st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": names})}) | json_values
response_formats = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "xml"])}),
    st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
        {"name": names}, optional={"schema": schemas | json_values, "strict": st.booleans()})}),
    json_values)
numbers = st.integers(-3, 10) | st.floats(-3, 3, allow_nan=False) | st.integers(-2**70, 2**70) | scalars


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """`good` about three times in four."""
    return st.integers(0, 3).flatmap(lambda k: bad if k == 3 else good)


# Each body is a plausible request with a few fields set (most to valid values), or anything at all.
CHAT_FIELDS = {
    "max_tokens": mostly(st.integers(1, 6), numbers), "max_completion_tokens": mostly(st.integers(1, 6), numbers),
    "temperature": mostly(st.floats(0, 2), numbers), "top_p": mostly(st.floats(0, 1), numbers),
    "n": mostly(st.integers(1, 3), numbers), "seed": mostly(st.integers(-2**63, 2**64 - 1), numbers),
    "presence_penalty": mostly(st.floats(-2, 2), numbers), "frequency_penalty": mostly(st.floats(-2, 2), numbers),
    "repetition_penalty": mostly(st.floats(0.1, 10), numbers), "top_k": mostly(st.integers(0, 100), numbers),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=6) | scalars,
    "stream": mostly(st.booleans(), scalars),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()}), json_values),
    "tools": tools, "tool_choice": tool_choices, "parallel_tool_calls": mostly(st.booleans(), scalars),
    "functions": st.lists(functions, max_size=2) | json_values,
    "function_call": st.sampled_from(["none", "auto"]) | st.fixed_dictionaries({"name": names}) | json_values,
    "response_format": response_formats, "logprobs": st.booleans() | scalars, "user": mostly(st.text(max_size=5), scalars),
    "unknown_field": json_values,
}


@st.composite
def chat_bodies(draw) -> dict:
    body = {"model": draw(scalars if draw(st.integers(0, 3)) == 3 else st.sampled_from([MODEL] * 8 + ["gpt-4", ""])),
            "messages": draw(mostly(plausible_messages, st.lists(messages, max_size=4) | json_values))}
    for key in draw(st.lists(st.sampled_from(sorted(CHAT_FIELDS)), max_size=4, unique=True)):
        body[key] = draw(CHAT_FIELDS[key])
    if draw(st.integers(0, 3)) == 3:
        body.pop(draw(st.sampled_from(sorted(body))))
    return body


@pytest.fixture(scope="module")
def api() -> Iterator[TestClient]:
    app, _ = answer_app()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def check_chat_response(r, body, record: bool = True) -> None:
    param = r.json()["error"]["param"] if r.status_code >= 400 else ""
    if record:
        event(f"status {r.status_code} {param}")  # the distribution shows with --hypothesis-show-statistics
    assert r.status_code < 500, (r.status_code, r.text, body)
    if r.status_code != 200:
        assert_openai_error(r.status_code, r.json())
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        chunks = sse_payloads(r.text)
        assert not any("error" in c for c in chunks), (chunks, body)
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    else:
        ChatCompletion.model_validate(r.json())


@prop
@given(body=mostly(chat_bodies(), json_values))
def test_any_chat_body_is_answered_or_refused_with_an_openai_error(api, body):
    check_chat_response(api.post("/v1/chat/completions", json=body), body)


@prop
@given(raw=st.binary(max_size=60) | st.text(max_size=60).map(str.encode),
       content_type=st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]))
def test_any_raw_bytes_are_refused_with_an_openai_error(api, raw, content_type):
    r = api.post("/v1/chat/completions", content=raw, headers={"Content-Type": content_type} if content_type else {})
    check_chat_response(r, raw)


def test_the_generator_reaches_the_model(api):
    """The strategies aren't all rejects: a plausible body gets a completion from the backend."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = api.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Sure thing"
    r = api.post("/v1/chat/completions", json={**body, "stream": True})
    assert [c["choices"][0]["delta"].get("content") for c in sse_payloads(r.text)[1:3]] == ["Sure", " thing"]


embedding_bodies = st.fixed_dictionaries(
    {"model": mostly(st.sampled_from(["all-MiniLM-L6-v2"] * 4 + ["answer-bot"]), scalars),
     "input": mostly(st.text(max_size=10) | st.lists(st.text(max_size=5), max_size=3), json_values)},
    optional={"encoding_format": mostly(st.sampled_from(["float", "base64"]), scalars),
              "dimensions": mostly(st.just(4), numbers), "user": scalars})


@prop
@given(body=mostly(embedding_bodies, json_values))
def test_any_embedding_body_is_answered_or_refused_with_an_openai_error(api, body, monkeypatch):
    # The embedder itself is tested with the real model in test_api.py; here it is a stub so the
    # property checks request handling only.
    from chatglm_core.api import embeddings

    def fake_embed(self, texts, dimensions=None):
        import numpy as np

        from chatglm_core.errors import RequestError

        if dimensions is not None and dimensions != 4:
            raise RequestError("wrong dimensions", param="dimensions")
        return [np.ones(4, dtype="float32") for _ in texts], len(texts)

    monkeypatch.setattr(embeddings.Embedder, "embed", fake_embed)
    r = api.post("/v1/embeddings", json=body)
    event(f"status {r.status_code}")
    assert r.status_code < 500, (r.status_code, r.text, body)
    if r.status_code == 200:
        data = r.json()["data"]
        assert len(data) == (1 if isinstance(body["input"], str) else len(body["input"]))
    else:
        assert_openai_error(r.status_code, r.json())


@prop
@given(path=st.text(alphabet="abcdefgv1/-_.%", max_size=20), method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
def test_any_path_and_method_gets_a_status_below_500(api, path, method):
    r = api.request(method, "/" + path.lstrip("/"), json={})
    assert r.status_code < 500, (method, path, r.text)
    if r.status_code >= 400:
        assert_openai_error(r.status_code, r.json())
    else:
        json.loads(r.text)


def nested(depth: int, leaf: str = "{}") -> str:
    return '{"items": ' * depth + leaf + "}" * depth


@pytest.mark.parametrize("depth", [50, 900, 5000])
@pytest.mark.parametrize("where", ["tools", "response_format", "arguments", "unknown"])
def test_deeply_nested_json_is_refused_or_answered_never_a_500(api, depth, where):
    schema = '{"type": "object", "properties": {"a": ' + nested(depth) + "}}"
    extra = {
        "tools": f', "tools": [{{"type": "function", "function": {{"name": "f", "parameters": {schema}}}}}]',
        "response_format": f', "response_format": {{"type": "json_schema", "json_schema": {{"name": "r", '
                           f'"schema": {schema}}}}}',
        "arguments": ', "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"id": '
                     f'"c", "function": {{"name": "f", "arguments": {nested(depth, "1")}}}}}]}}, {{"role": "tool", '
                     '"tool_call_id": "c", "content": "x"}]',
        "unknown": f', "unknown": {nested(depth)}',
    }[where]
    raw = '{"model": "answer-bot", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2' + extra + "}"
    r = api.post("/v1/chat/completions", content=raw.encode(), headers={"Content-Type": "application/json"})
    check_chat_response(r, where, record=False)


@settings(max_examples=EXAMPLES, deadline=None)
@given(pieces=st.lists(st.text(alphabet="ab \ufffd<", max_size=4), min_size=1, max_size=6))
def test_streamed_text_equals_the_final_text(pieces):
    """What the backend streams adds up to the reply it returns (found by the soak: a character
    cut by max_tokens was dropped from the stream but kept in the final text)."""
    from chatglm_core.backends.decoding import TextAssembler

    assembler, text, streamed = TextAssembler([], hold=[]), "", ""
    for piece in pieces:
        text += piece
        streamed += assembler.feed(text)[0]
    streamed += assembler.flush()
    assert streamed == assembler.text == text


@pytest.mark.parametrize(("extra", "param"), [
    ({"stop": 5}, "stop"),
    ({"tool_choice": {"type": "function"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "x": 1}]}]}, "messages[0].content"),
    ({"tools": [{"type": "function", "function": {"name": 5}}]}, "tools[0].function.name"),
    # a discriminated union's tag ("json_schema", the value of "type") is not part of the path
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
])
def test_error_param_is_the_request_path_without_pydantic_union_names(api, extra, param):
    r = api.post("/v1/chat/completions", json={"model": "answer-bot", "messages": [{"role": "user", "content": "hi"}],
                                               **extra})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param
    assert "str:" not in error["message"] and "list[" not in error["message"] and "literal[" not in error["message"]
