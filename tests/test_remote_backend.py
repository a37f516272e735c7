"""RemoteBackend against this project's own server on loopback (no other network).

The real SmolLM2 serves plain chat and streaming; an in-thread server over the scripted backend
supplies exact tool calls, so the assembly of streamed tool-call deltas is checked end to end.
"""

from __future__ import annotations

import threading
import time

import pytest
from test_api import KEY, MODEL, WEATHER, ThreadServer, free_port, held_back_backend, start_server, stop_server

from chatglm_core.backends.base import Constraint, GenerationOptions
from chatglm_core.backends.remote import RemoteBackend, constraint_kwargs, wire_messages
from chatglm_core.engine import Engine
from chatglm_core.errors import ConfigError, GenerationError, RequestError
from chatglm_core.messages import INTERPRETER, Done, Message, Role, TextDelta, ToolCall
from chatglm_core.settings import load_settings

GREEDY = GenerationOptions(max_new_tokens=9, temperature=0, repetition_penalty=1.0)
FRANCE = [Message(Role.USER, "What is the capital of France?")]


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--api-key", KEY)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def engine(server) -> Engine:
    return Engine(RemoteBackend.from_settings(load_settings(remote_base_url=server + "/v1", remote_api_key=KEY)))


def test_settings_select_the_remote_backend_and_discover_the_model(engine, server):
    from chatglm_core.backends import load_backend

    assert engine.model_name == MODEL and engine.backend.device == "remote"
    backend = load_backend(load_settings(remote_base_url=server + "/v1", remote_api_key=KEY, remote_model="chatglm3-6b"))
    assert isinstance(backend, RemoteBackend) and backend.model_name == "chatglm3-6b"


def test_plain_chat_streams_text_and_ends_with_done(engine, server):
    import openai

    events = list(engine.stream(FRANCE, GREEDY))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    done = events[-1]
    assert isinstance(done, Done) and done.message.content == text.strip() and "Paris" in text
    assert done.finish_reason == "stop" and done.usage.prompt_tokens > 10 and 0 < done.usage.completion_tokens <= 9
    direct = openai.OpenAI(base_url=server + "/v1", api_key=KEY).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": FRANCE[0].content}], max_tokens=9, temperature=0,
        extra_body={"repetition_penalty": 1.0})
    assert direct.choices[0].message.content == done.message.content  # options went through unchanged


def test_stop_and_length_pass_through(engine):
    done = engine.complete(FRANCE, GenerationOptions(**{**GREEDY.__dict__, "stop": [" of "]}))
    assert done.message.content == "The capital" and done.finish_reason == "stop"
    done = engine.complete(FRANCE, GenerationOptions(**{**GREEDY.__dict__, "max_new_tokens": 2}))
    assert done.finish_reason == "length" and done.usage.completion_tokens == 2


def test_cancel_closes_the_stream_and_frees_the_remote(engine):
    cancel = threading.Event()
    long = [Message(Role.USER, "Write a very long story about a dragon.")]
    events = []
    for ev in engine.stream(long, GenerationOptions(max_new_tokens=4000, temperature=0), cancel=cancel):
        events.append(ev)
        if len(events) == 3:
            cancel.set()
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "cancelled"
    started = time.monotonic()
    assert engine.complete(FRANCE, GenerationOptions(max_new_tokens=2, temperature=0)).finish_reason == "length"
    assert time.monotonic() - started < 30  # the story was stopped on the server, not left running


def test_remote_errors_are_clear(server):
    down = RemoteBackend.from_settings(load_settings(remote_base_url=f"http://127.0.0.1:{free_port()}/v1",
                                                     remote_model="m"))
    with pytest.raises(GenerationError, match="remote engine at http://127.0.0.1"):
        Engine(down).complete(FRANCE, GREEDY)
    with pytest.raises(ConfigError, match="could not list the models"):
        RemoteBackend.from_settings(load_settings(remote_base_url=f"http://127.0.0.1:{free_port()}/v1"))
    with pytest.raises(ConfigError):  # wrong key: listing the models fails with 401
        RemoteBackend.from_settings(load_settings(remote_base_url=server + "/v1", remote_api_key="wrong"))
    unknown = RemoteBackend.from_settings(load_settings(remote_base_url=server + "/v1", remote_api_key=KEY,
                                                        remote_model="no-such-model"))
    with pytest.raises(RequestError) as e:
        Engine(unknown).complete(FRANCE, GREEDY)
    assert e.value.status == 404 and e.value.code == "model_not_found"


def test_tool_calls_are_assembled_from_streamed_deltas():
    from chatglm_core.api import create_app
    from chatglm_core.settings import Settings

    scripted = held_back_backend()
    scripted.enqueue('Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
                     "Sunny in Paris.")
    with ThreadServer(create_app(Settings(), Engine(scripted))) as srv:
        engine = Engine(RemoteBackend.from_settings(load_settings(remote_base_url=srv.url + "/v1")))
        done = engine.complete([Message(Role.USER, "Weather in Paris?")], GREEDY, tools=[WEATHER])
        assert done.finish_reason == "tool_calls" and done.message.content == "Checking."
        call = done.message.tool_calls[0]
        assert (call.name, call.arguments) == ("get_weather", {"city": "Paris"}) and call.id.startswith("call_")
        history = [Message(Role.USER, "Weather in Paris?"), done.message,
                   Message(Role.TOOL, '{"sky": "sunny"}', tool_call_id=call.id, name="get_weather")]
        final = engine.complete(history, GREEDY, tools=[WEATHER])
    assert final.message.content == "Sunny in Paris." and final.finish_reason == "stop"
    seen = scripted.calls[-1]
    assert seen[1].tool_calls[0].id == call.id and seen[2].tool_call_id == call.id


def test_constraints_become_openai_parameters():
    tools = (WEATHER,)
    assert constraint_kwargs(Constraint("json_object"), None) == {"response_format": {"type": "json_object"}}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert constraint_kwargs(Constraint("json_schema", schema=schema), None)["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "response", "schema": schema, "strict": True}}
    assert constraint_kwargs(Constraint("tool_call", tools=tools), None) == {"tools": [WEATHER],
                                                                            "tool_choice": "required"}
    assert constraint_kwargs(Constraint("tool_call", tools=tools, auto=True), None)["tool_choice"] == "auto"
    assert constraint_kwargs(Constraint("tool_call", tools=tools, tool_name="get_weather"), None)["tool_choice"] == {
        "type": "function", "function": {"name": "get_weather"}}


def test_interpreter_turns_travel_as_text():
    call = ToolCall(INTERPRETER, {"code": "print(1 + 1)"}, "call_1")
    wire = wire_messages([Message(Role.USER, "Compute"), Message(Role.ASSISTANT, "Sure.", [call]),
                          Message(Role.TOOL, "2", tool_call_id="call_1", name=INTERPRETER)])
    assert wire[1] == {"role": "assistant", "content": "Sure.\n```python\nprint(1 + 1)\n```"}
    assert wire[2] == {"role": "user", "content": "Output of the code:\n2"}
    plain = wire_messages([Message(Role.ASSISTANT, "", [ToolCall("f", {"x": 1}, "c9")]),
                           Message(Role.TOOL, "ok", tool_call_id="c9")])
    assert plain[0]["tool_calls"][0]["id"] == "c9" and plain[1] == {"role": "tool", "content": "ok",
                                                                    "tool_call_id": "c9"}
