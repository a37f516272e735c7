"""Conversation store: round trips, per-client isolation, ordering, concurrency, import/export."""

from __future__ import annotations

import json
import threading

import pytest

from chatglm_core.errors import RequestError
from chatglm_core.messages import INTERPRETER, Message, Role, ToolCall
from chatglm_core.store import (
    Conversation,
    ConversationStore,
    conversation_from_json,
    conversation_to_json,
    conversation_to_markdown,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))


@pytest.fixture
def store(tmp_path):
    return ConversationStore(tmp_path / "sub" / "conv.sqlite3")


def tool_conversation(client: str = "c1") -> Conversation:
    call = ToolCall(INTERPRETER, {"code": "print(1)"}, "call_1")
    return Conversation(client, "interpreter", [
        Message(Role.SYSTEM, "be brief"),
        Message(Role.USER, "plot   something\nplease"),
        Message(Role.ASSISTANT, "Sure.", [call]),
        Message(Role.TOOL, "1", tool_call_id="call_1", name=INTERPRETER, images=[PNG]),
        Message(Role.ASSISTANT, "Done: <b>1</b>"),
    ])


def test_round_trip_keeps_every_field(store):
    conv = store.save(tool_conversation())
    back = store.get("c1", conv.id)
    assert back is not None
    assert back.messages == conv.messages
    assert back.messages[3].images == [PNG]
    assert back.messages[2].tool_calls[0] == ToolCall(INTERPRETER, {"code": "print(1)"}, "call_1")
    assert back.title == "plot something please"
    assert back.mode == "interpreter"


def test_a_new_store_on_the_same_file_sees_saved_rows(tmp_path):
    path = tmp_path / "conv.sqlite3"
    conv = ConversationStore(path).save(tool_conversation())
    assert ConversationStore(path).get("c1", conv.id).messages == conv.messages


def test_clients_only_see_their_own(store):
    mine = store.save(tool_conversation("alice"))
    assert store.get("bob", mine.id) is None
    assert store.list("bob") == []
    assert not store.delete("bob", mine.id)
    # a row with the same id from another client must not overwrite alice's
    intruder = Conversation("bob", "chat", [Message(Role.USER, "overwrite")], id=mine.id)
    store.save(intruder)
    assert store.get("alice", mine.id).messages == mine.messages


def test_list_by_mode_newest_first_and_delete(store):
    a = store.save(Conversation("c", "chat", [Message(Role.USER, "first")]))
    b = store.save(Conversation("c", "chat", [Message(Role.USER, "second")]))
    store.save(Conversation("c", "tools", [Message(Role.USER, "tool one")]))
    assert [c.title for c in store.list("c", "chat")] == ["second", "first"]
    assert len(store.list("c")) == 3
    store.save(a)  # touching a moves it to the top
    assert [c.id for c in store.list("c", "chat")] == [a.id, b.id]
    assert store.delete("c", a.id)
    assert [c.id for c in store.list("c", "chat")] == [b.id]


def test_long_titles_are_shortened(store):
    conv = store.save(Conversation("c", "chat", [Message(Role.USER, "word " * 40)]))
    assert len(conv.title) <= 60 and conv.title.endswith("…")


def test_concurrent_writers(store):
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(10):
                conv = Conversation(f"client{n}", "chat", [Message(Role.USER, f"{n}-{i}")])
                store.save(conv)
                assert store.get(f"client{n}", conv.id) is not None
        except BaseException as e:  # collected for the assert below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(len(store.list(f"client{n}")) == 10 for n in range(6))


def test_json_export_import_round_trip():
    conv = tool_conversation()
    text = conversation_to_json(conv)
    back = conversation_from_json(text, client_id="other", mode="interpreter")
    assert back.messages == conv.messages
    assert back.client_id == "other" and back.id != conv.id
    # a bare list of OpenAI-style messages is accepted too
    bare = conversation_from_json(json.dumps([{"role": "user", "content": "hi"}]), client_id="x", mode="chat")
    assert bare.messages == [Message(Role.USER, "hi")]


@pytest.mark.parametrize("text, fragment", [
    ("not json", "not valid JSON"),
    ('{"title": "x"}', "'messages' list"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "unknown role"),
    ('{"messages": [{"role": "tool", "content": "x", "images": ["***"]}]}', "base64"),
])
def test_bad_imports_name_the_problem(text, fragment):
    with pytest.raises(RequestError, match=fragment):
        conversation_from_json(text, client_id="x", mode="chat")


def test_markdown_export():
    md = conversation_to_markdown(tool_conversation())
    assert md.startswith("# plot something please\n")
    assert "**User**\n\nplot   something\nplease" in md
    assert "```python\nprint(1)\n```" in md
    assert "**Observation (interpreter)**\n\n```\n1\n```" in md
    assert "Done: <b>1</b>" in md
