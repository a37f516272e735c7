"""The OpenAI-compatible server, driven by the official `openai` client and plain httpx.

Two servers per module: the real SmolLM2 behind `python -m chatglm_core.api` (a subprocess, as
users run it), and an in-thread app over a scripted backend for the tool-call wire shapes the
tiny model won't produce unforced. Forced tool calls and JSON mode with the real model need
grammar-constrained decoding and live in test_api_constrained.py.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

KEY = "sk-test-key"
MODEL = "SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = Path(os.environ.get("CHATGLM_TEST_DATA", "/tmp/chatglm-test-data"))
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server at {url} did not become healthy in {timeout} s")


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    """`python -m chatglm_core.api` on a free loopback port; returns (process, base url)."""
    port = free_port()
    TEST_DATA.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "chatglm_core.api", "--port", str(port), "--data-dir", str(TEST_DATA),
           "--device", "cpu", "--log-level", "warning", *flags]  # the default backend: llama.cpp when installed
    env = {k: v for k, v in os.environ.items()
           if (not k.startswith("CHATGLM_") or k == "CHATGLM_THREADS") and k != "MODEL_PATH"}  # the Makefile's
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ThreadServer:
    """uvicorn serving an app object on a daemon thread (for apps built around a test engine)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        wait_healthy(self.url, timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc, url = start_server("--api-key", KEY)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def held_back_backend():
    """The scripted backend, streaming like the real one: the real backend's text assembler holds
    back `<tool_call>`, and a malformed call ends as text with `parse_error` set."""
    from conftest import ScriptedBackend

    from chatglm_core.backends.decoding import TextAssembler
    from chatglm_core.errors import ParseError
    from chatglm_core.formats.parsing import TOOL_CALL_OPEN, parse_json_turn
    from chatglm_core.messages import Done, Message, TextDelta, Usage

    class HeldBack(ScriptedBackend):
        def stream(self, messages, options, *, tools=None, interpreter=False, cancel=None):
            assembler = TextAssembler(options.stop, hold=[TOOL_CALL_OPEN] if tools else [])
            for ev in super().stream(messages, options, tools=None, interpreter=interpreter, cancel=cancel):
                if isinstance(ev, TextDelta):
                    delta, _ = assembler.feed(assembler.text + ev.text)
                    if delta:
                        yield TextDelta(delta)
            tail = assembler.flush()
            if tail:
                yield TextDelta(tail)
            text, usage = assembler.text, Usage(3, len(assembler.text.split()))
            try:
                message = parse_json_turn(text, tools=bool(tools))
            except ParseError as e:
                yield Done(Message("assistant", text.strip()), "stop", usage, raw_text=text, parse_error=str(e))
                return
            yield Done(message, "tool_calls" if message.tool_calls else "stop", usage, raw_text=text)

    return HeldBack()


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, object]]:
    """An in-thread server over the scripted backend: (base url, backend to enqueue replies on)."""
    from chatglm_core.api import create_app
    from chatglm_core.engine import Engine
    from chatglm_core.settings import Settings

    backend = held_back_backend()
    with ThreadServer(create_app(Settings(), Engine(backend))) as srv:
        yield srv.url, backend


def ask(client: openai.OpenAI, content: str, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def streamed(client: openai.OpenAI, content: str, **kw) -> tuple[str, list]:
    chunks = list(ask(client, content, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# --- models and health -------------------------------------------------------------------
def test_health_needs_no_key_and_models_list_served_name_aliases_and_embedder(server, client):
    assert httpx.get(server + "/health").json() == {"status": "ok", "model": MODEL}
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "chatglm3-6b", "all-MiniLM-L6-v2"]
    assert client.models.retrieve("chatglm3-6b").id == "chatglm3-6b"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"


# --- chat -----------------------------------------------------------------------------------
def test_chat_answers_with_usage_and_the_alias_works(client):
    r = ask(client, "What is the capital of France?", max_tokens=9)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.role == "assistant"
    assert r.model == MODEL and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert 0 < r.usage.completion_tokens <= 9 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    alias = client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": "What is the "
                                           "capital of France?"}], max_tokens=9, temperature=0)
    assert alias.choices[0].message.content == r.choices[0].message.content


def test_streaming_equals_non_streaming_and_reports_usage(client):
    whole = ask(client, "Name three colours.", max_tokens=6)
    text, chunks = streamed(client, "Name three colours.", max_tokens=6, stream_options={"include_usage": True})
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_a_follow_up_turn_reports_its_cached_prompt_tokens(client):
    """The next turn of a chat starts from the previous turn's KV: OpenAI's
    usage.prompt_tokens_details.cached_tokens counts the prompt tokens not computed again."""
    first = [{"role": "user", "content": "Describe a lighthouse in two sentences."}]
    r = client.chat.completions.create(model=MODEL, messages=first, max_tokens=12, temperature=0)
    follow_up = first + [{"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": "And a harbour?"}]
    again = client.chat.completions.create(model=MODEL, messages=follow_up, max_tokens=4, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert r.usage.prompt_tokens <= cached < again.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=follow_up, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1  # all but the last


def test_sse_wire_format_ends_with_done(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_the_reply(client):
    full = ask(client, "What is the capital of France?", max_tokens=9).choices[0].message.content
    assert " of " in full
    cut = ask(client, "What is the capital of France?", max_tokens=9, stop=[" of ", "zzz"])
    assert cut.choices[0].message.content == full.split(" of ")[0] and cut.choices[0].finish_reason == "stop"
    text, _ = streamed(client, "What is the capital of France?", max_tokens=9, stop=" of ")
    assert text == full.split(" of ")[0]


def test_max_tokens_and_max_completion_tokens_limit_the_reply(client):
    r = ask(client, "Write a long poem about the sea.", max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = ask(client, "Write a long poem about the sea.", max_tokens=None, max_completion_tokens=4)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


def test_seed_reproduces_sampling_and_n_gives_several_choices(client):
    kw = {"temperature": 1.0, "top_p": 1.0, "seed": 1234, "max_tokens": 5}
    # From the prompt cache, as every request after the first is: on llama.cpp a cold prompt's logits
    # differ from a cached one's in float16's last bits (a many-token step rounds differently from a
    # one-token one), which can move a draw at temperature 1 (llama-server's cache_prompt says the same)
    ask(client, "Tell me a fun fact.", max_tokens=1)
    a = ask(client, "Tell me a fun fact.", **kw)
    b = ask(client, "Tell me a fun fact.", **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    many = ask(client, "Tell me a fun fact.", n=2, **kw)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].message.content == a.choices[0].message.content  # choice i uses seed + i
    assert 2 <= many.usage.completion_tokens <= 10
    chunks = list(ask(client, "Tell me a fun fact.", n=2, stream=True, **kw))
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in (0, 1)]
    assert texts == [many.choices[0].message.content, many.choices[1].message.content]


def test_penalties_and_repetition_penalty_are_accepted_and_change_greedy_output(client):
    no_rp = {"repetition_penalty": 1.0}
    plain = ask(client, "Repeat the word cat ten times.", max_tokens=8, extra_body=no_rp).choices[0].message.content
    penalised = ask(client, "Repeat the word cat ten times.", max_tokens=8, frequency_penalty=2.0,
                    presence_penalty=2.0, extra_body=no_rp).choices[0].message.content
    repetition = ask(client, "Repeat the word cat ten times.", max_tokens=8,
                     extra_body={"repetition_penalty": 3.0}).choices[0].message.content
    assert penalised != plain and repetition != plain


def test_history_with_system_and_developer_messages(client):
    r = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}])
    assert r.choices[0].message.content


# --- concurrency and cancellation -----------------------------------------------------------
def test_eight_parallel_streams_each_equal_their_sequential_greedy_output(client):
    prompts = [f"Say something about the number {i}." for i in range(8)]
    sequential = [streamed(client, p, max_tokens=4)[0] for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda p: streamed(client, p, max_tokens=4)[0], prompts))
    assert parallel == sequential
    assert len(set(sequential)) > 1  # different prompts, different answers: outputs can't have been swapped


def test_disconnect_mid_stream_cancels_the_generation(server, http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server, headers=http.headers, timeout=60) as c, \
            c.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any('"content"' in line for line in got)
    started = time.monotonic()
    r = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
    assert r.status_code == 200
    assert time.monotonic() - started < 30  # the 4000-token story would hold the model for minutes


def test_disconnect_while_waiting_non_streaming_cancels_the_generation(server, http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 4000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/chat/completions", json=body, headers=http.headers, timeout=3)
    started = time.monotonic()
    assert http.post("/v1/chat/completions", json={**body, "max_tokens": 2}).status_code == 200
    assert time.monotonic() - started < 30


# --- errors ---------------------------------------------------------------------------------
def _chat(**overrides):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    body.update(overrides)
    return body


BAD_REQUESTS = [
    # (body, status, param, code)
    (_chat(model="gpt-4"), 404, "model", "model_not_found"),
    (_chat(messages=[]), 400, "messages", None),
    (_chat(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]), 400, "messages", None),
    (_chat(messages=[{"role": "tool", "content": "a", "tool_call_id": "x"}]), 400, "messages", None),
    (_chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), 400, "messages", None),
    (_chat(messages=[{"role": "wizard", "content": "a"}]), 400, "messages[0].role", None),
    (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, None, None),
    (_chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "r"}]), 400, "messages[1]", None),
    (_chat(temperature=3), 400, "temperature", None),
    (_chat(temperature=-0.1), 400, "temperature", None),
    (_chat(top_p=1.5), 400, "top_p", None),
    (_chat(n=0), 400, "n", None),
    (_chat(n=9), 400, "n", None),
    (_chat(max_tokens=0), 400, "max_tokens", None),
    (_chat(max_tokens=10**9), 400, "max_tokens", None),
    (_chat(presence_penalty=5), 400, "presence_penalty", None),
    (_chat(repetition_penalty=0), 400, "repetition_penalty", None),
    (_chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    (_chat(seed=2**70), 400, "seed", None),
    (_chat(logprobs=True), 400, "logprobs", None),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 12}}}]), 400,
     "tools[0].function.parameters", "invalid_schema"),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]), 400,
     "tools[0].function.parameters", "invalid_function_parameters"),
    (_chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), 400, "tools[0].function.name", None),
    (_chat(tools=[WEATHER, WEATHER]), 400, "tools[1].function.name", None),
    (_chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), 400, "tool_choice", None),
    (_chat(tool_choice="required"), 400, "tool_choice", None),
    (_chat(tools=[WEATHER], functions=[WEATHER["function"]]), 400, "functions", None),
    (_chat(function_call="auto"), 400, "function_call", None),
    (_chat(functions=[{"name": "f", "parameters": {"type": "object", "properties": 3}}]), 400,
     "functions[0].parameters", "invalid_schema"),
    (_chat(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "nope"}}}), 400,
     "response_format.json_schema.schema", "invalid_schema"),
    (_chat(response_format={"type": "xml"}), 400, "response_format", None),
    (_chat(tools=[WEATHER], response_format={"type": "json_object"}), 400, "response_format", None),
    ([1, 2, 3], 400, None, None),
    ({"messages": [{"role": "user", "content": "a"}]}, 400, "model", None),
]


@pytest.mark.parametrize("body,status,param,code", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(http, body, status, param, code):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if param is not None:
        assert (err["param"] or "").startswith(param), err
    if code is not None:
        assert err["code"] == code


def test_invalid_json_and_wrong_content_are_400(http):
    r = http.post("/v1/chat/completions", content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = http.post("/v1/chat/completions", content=b"hello", headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_unknown_path_and_method_use_the_error_shape(http):
    assert http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_the_context_window_is_400(client, stream):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hello " * 9000, max_tokens=2, stream=stream)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.status_code == 400


def test_api_key_is_required_when_configured(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        r = httpx.post(server + "/v1/chat/completions", json=_chat(), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()


def test_openapi_document_lists_400_instead_of_422(server):
    doc = httpx.get(server + "/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert "422" not in chat["responses"] and {"400", "401", "404"} <= set(chat["responses"])
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["n"]["maximum"] == 8


# --- embeddings -----------------------------------------------------------------------------
def cos(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_embeddings_shape_and_similarity(client):
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "The stock market fell sharply today."]
    r = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the client asks for base64
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and all(len(v) == 384 for v in vecs)
    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.2
    assert abs(np.linalg.norm(vecs[0]) - 1) < 1e-3 and r.usage.prompt_tokens > 10
    single = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0], encoding_format="float")
    assert np.allclose(single.data[0].embedding, vecs[0], atol=1e-5)


def test_embeddings_base64_is_little_endian_float32(http):
    r = http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "hello", "encoding_format": "base64"})
    floats = http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "hello"}).json()
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (384,) and np.allclose(vec, floats["data"][0]["embedding"], atol=1e-6)


@pytest.mark.parametrize("body,status,param", [
    ({"model": "text-embedding-3-small", "input": "x"}, 404, "model"),
    ({"model": "all-MiniLM-L6-v2", "input": []}, 400, "input"),
    ({"model": "all-MiniLM-L6-v2", "input": [[1, 2, 3]]}, 400, "input"),
    ({"model": "all-MiniLM-L6-v2", "input": "x", "dimensions": 64}, 400, "dimensions"),
    ({"model": "all-MiniLM-L6-v2", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "all-MiniLM-L6-v2"}, 400, "input"),
])
def test_embedding_errors(http, body, status, param):
    r = http.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    assert (r.json()["error"]["param"] or "").startswith(param)


# --- tool calls and legacy functions (scripted backend: exact wire shapes) --------------------
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_tool_call_round_trip(fake):
    url, backend = fake
    backend.enqueue(CALL, "It is sunny in Paris.")
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = c.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
    final = c.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
    assert final.choices[0].message.content == "It is sunny in Paris." and final.choices[0].finish_reason == "stop"
    seen = backend.calls[-1]
    assert seen[1].tool_calls[0].id == call.id and seen[2].tool_call_id == call.id and seen[2].role.value == "tool"


def test_streamed_tool_call_arrives_as_tool_call_deltas(fake):
    url, backend = fake
    backend.enqueue("Let me check. " + CALL)
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    chunks = list(c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Weather?"}],
                                            tools=[WEATHER], tool_choice="auto", stream=True))
    deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    assert json.loads(deltas[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text.strip() == "Let me check."  # the call never leaks as text


def test_tool_choice_none_hides_the_tools(fake):
    url, backend = fake
    backend.enqueue("Plain answer.")
    r = httpx.post(url + "/v1/chat/completions", json=_chat(model="scripted", tools=[WEATHER], tool_choice="none"))
    assert r.json()["choices"][0]["message"]["content"] == "Plain answer."


def test_legacy_functions_request_gets_a_function_call(fake):
    """The request shape of openai 0.28-era clients (ChatGLM3's own demos)."""
    url, backend = fake
    backend.enqueue(CALL, "Sunny.")
    body = {"model": "chatglm3-6b", "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "functions": [WEATHER["function"]], "function_call": "auto"}
    r = httpx.post(url + "/v1/chat/completions", json=body).json()
    message = r["choices"][0]["message"]
    assert r["choices"][0]["finish_reason"] == "function_call" and "tool_calls" not in message
    assert message["function_call"]["name"] == "get_weather"
    assert json.loads(message["function_call"]["arguments"]) == {"city": "Paris"}
    body["messages"] += [message, {"role": "function", "name": "get_weather", "content": "sunny"}]
    r = httpx.post(url + "/v1/chat/completions", json=body).json()
    assert r["choices"][0]["message"]["content"] == "Sunny."
    assert backend.calls[-1][-1].role.value == "tool" and backend.calls[-1][-1].name == "get_weather"


def test_legacy_functions_stream_function_call_deltas(fake):
    url, backend = fake
    backend.enqueue(CALL)
    body = {"model": "chatglm3-6b", "messages": [{"role": "user", "content": "Weather?"}],
            "functions": [WEATHER["function"]], "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    calls = [e["choices"][0]["delta"]["function_call"] for e in events if "function_call" in e["choices"][0]["delta"]]
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert events[-1]["choices"][0]["finish_reason"] == "function_call"


def test_malformed_call_comes_back_as_text(fake):
    url, backend = fake
    backend.enqueue('<tool_call>{"name": get_weather}</tool_call>')
    body = _chat(model="scripted", tools=[WEATHER], stream=True)
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert text == '<tool_call>{"name": get_weather}</tool_call>'
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_cors_is_closed_by_default_and_opens_for_configured_origins(fake):
    url, _ = fake
    pre = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(url + "/v1/chat/completions", headers=pre).headers
    from conftest import ScriptedBackend

    from chatglm_core.api import create_app
    from chatglm_core.engine import Engine
    from chatglm_core.settings import Settings

    app = create_app(Settings(cors_origins="http://ok.example"), Engine(ScriptedBackend()))
    with ThreadServer(app) as srv:
        ok = httpx.options(srv.url + "/v1/models", headers={**pre, "Origin": "http://ok.example"})
        bad = httpx.options(srv.url + "/v1/models", headers=pre)
    assert ok.headers.get("access-control-allow-origin") == "http://ok.example"
    assert "access-control-allow-origin" not in bad.headers


def test_the_server_freezes_what_it_loaded_before_it_serves(monkeypatch):
    """`python -m chatglm_core.api` puts what it loaded (torch, transformers, the model's Python side) out
    of the cyclic garbage collector's sight before serving: a full collection with it in sight took
    ~120 ms here, a pause that would land on some request's tokens."""
    import gc

    import uvicorn

    from chatglm_core import backends
    from chatglm_core.api.__main__ import main

    loaded, frozen = [], []
    load = backends.load_backend
    monkeypatch.setattr(backends, "load_backend", lambda settings: loaded.append(load(settings)) or loaded[-1])
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: frozen.append(gc.get_freeze_count()))
    try:
        assert main(["--port", "0", "--data-dir", str(TEST_DATA), "--device", "cpu", "--log-level", "warning"]) == 0
    finally:
        gc.unfreeze()
        for backend in loaded:
            backend.close()
    assert len(loaded) == 1 and frozen and frozen[0] > 10_000, frozen
