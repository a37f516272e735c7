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


# --- settings, pending calls and reply meta kept with the conversation (issue 18, items 3, 6, 7) ---
def test_settings_pending_call_and_reply_meta_survive_a_reopen(tmp_path):
    path = tmp_path / "conv.sqlite3"
    conv = tool_conversation()
    conv.settings = {"temperature": 0.3, "top_p": 0.8, "repetition_penalty": 1.1, "max_new_tokens": 77,
                     "system": "Answer in French."}
    conv.messages[-1].meta = {"finish": "length", "tokens": 77, "ttft_s": 0.12, "tok_s": 95.5, "max_new_tokens": 77}
    conv.messages.append(Message(Role.ASSISTANT, "", [ToolCall("ask_colleague", {"q": "when?"}, "call_9")]))
    conv.pending_call_id = "call_9"
    ConversationStore(path).save(conv)
    back = ConversationStore(path).get("c1", conv.id)  # a new process on the same file
    assert back.settings == conv.settings
    assert back.messages[4].meta == conv.messages[4].meta
    assert back.pending_call() == ToolCall("ask_colleague", {"q": "when?"}, "call_9")
    back.messages.append(Message(Role.TOOL, "at 3", tool_call_id="call_9", name="ask_colleague"))
    assert back.pending_call() is None  # answered: no longer waiting


OLD_SCHEMA = """
CREATE TABLE conversations (id TEXT PRIMARY KEY, client_id TEXT NOT NULL, mode TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '', messages TEXT NOT NULL DEFAULT '[]', created_at REAL NOT NULL,
    updated_at REAL NOT NULL);
INSERT INTO conversations VALUES ('old1', 'c1', 'chat', 'about dragons',
    '[{"role": "user", "content": "tell me about dragons"}, {"role": "assistant", "content": "They fly."}]', 1.0, 2.0);
"""


def test_a_database_from_the_first_version_is_migrated_and_searchable(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
    store = ConversationStore(path)
    old = store.get("c1", "old1")
    assert [m.content for m in old.messages] == ["tell me about dragons", "They fly."]
    assert old.settings == {} and old.pending_call_id is None
    assert [c.id for c in store.search("c1", "fly")] == ["old1"]  # indexed when the database was opened
    old.settings = {"system": "be brief"}
    store.save(old)
    assert ConversationStore(path).get("c1", "old1").settings == {"system": "be brief"}


# --- search (issue 18, item 8) ---------------------------------------------------------------------
@pytest.fixture(params=[True, False], ids=["fts5", "like"])
def searchable(request, tmp_path):
    store = ConversationStore(tmp_path / "s.sqlite3", full_text=request.param)
    assert store.fts is request.param  # CPython's sqlite3 has FTS5; the fallback is forced here
    return store


def test_search_finds_titles_and_message_text_of_this_client_only(searchable):
    dragons = searchable.save(Conversation("alice", "chat", [Message(Role.USER, "A story about dragons"),
                                                             Message(Role.ASSISTANT, "Once upon a time in Lyon.")]))
    recipe = searchable.save(Conversation("alice", "chat", [Message(Role.USER, "A pancake recipe"),
                                                            Message(Role.ASSISTANT, "Flour, eggs, milk.")]))
    tools = searchable.save(Conversation("alice", "tools", [Message(Role.USER, "What time is it in Lyon?")]))
    searchable.save(Conversation("bob", "chat", [Message(Role.USER, "dragons everywhere in Lyon")]))
    assert [c.id for c in searchable.search("alice", "dragon")] == [dragons.id]  # a title word, as a prefix
    assert [c.id for c in searchable.search("alice", "EGGS")] == [recipe.id]  # reply text, any case
    assert {c.id for c in searchable.search("alice", "lyon")} == {dragons.id, tools.id}
    assert [c.id for c in searchable.search("alice", "lyon", mode="tools")] == [tools.id]
    assert [c.id for c in searchable.search("alice", "story lyon")] == [dragons.id]  # every word must match
    assert searchable.search("alice", "unicorn") == []
    assert searchable.search("carol", "dragons") == []


@pytest.mark.parametrize("query", ['"', "AND OR NOT", "NEAR(", "title:x*", "50%_off", "   ", "'; DROP TABLE x"])
def test_search_takes_any_text_without_error(searchable, query):
    searchable.save(Conversation("c", "chat", [Message(Role.USER, "50% off for the title: x")]))
    assert isinstance(searchable.search("c", query), list)


def test_search_forgets_deleted_and_follows_updated_conversations(searchable):
    conv = searchable.save(Conversation("c", "chat", [Message(Role.USER, "apples")]))
    conv.messages.append(Message(Role.ASSISTANT, "bananas"))
    searchable.save(conv)
    assert [c.id for c in searchable.search("c", "bananas")] == [conv.id]
    searchable.delete("c", conv.id)
    assert searchable.search("c", "apples") == []


# --- export / import of the system prompt and settings (issue 18, item 6) --------------------------
def test_export_and_import_keep_the_system_prompt_and_settings():
    conv = tool_conversation()
    conv.settings = {"temperature": 0.25, "max_new_tokens": 300, "system": "You are terse."}
    data = json.loads(conversation_to_json(conv))
    assert data["system"] == "You are terse." and data["settings"] == {"temperature": 0.25, "max_new_tokens": 300}
    back = conversation_from_json(json.dumps(data), client_id="x", mode="interpreter")
    assert back.settings == conv.settings
    md = conversation_to_markdown(conv)
    assert "**System prompt**\n\nYou are terse." in md


@pytest.mark.parametrize("text, fragment", [
    ('{"messages": [], "system": 3}', "'system'"),
    ('{"messages": [], "settings": {"temperature": "hot"}}', "'temperature' must be a float"),
    ('{"messages": [], "settings": []}', "'settings' must be an object"),
    ('{"messages": [{"role": "user", "content": "x", "meta": 1}]}', "'meta' must be an object"),
])
def test_bad_settings_in_an_import_name_the_problem(text, fragment):
    with pytest.raises(RequestError, match=fragment):
        conversation_from_json(text, client_id="x", mode="chat")


def test_trash_hides_restore_brings_back_purge_deletes(store):
    conv = store.save(Conversation("c", "chat", [Message(Role.USER, "undo me")]))
    other = store.save(Conversation("c2", "chat", [Message(Role.USER, "not mine")]))
    assert store.trash("c", conv.id) and not store.trash("c2", conv.id)
    assert store.get("c", conv.id) is None and store.list("c") == [] and store.search("c", "undo") == []
    assert store.restore("c", conv.id) and store.get("c", conv.id).messages == conv.messages
    store.trash("c", conv.id)
    assert store.purge("c", older_than_s=600) == 0  # recent: kept for an undo
    assert store.purge("c") == 1 and not store.restore("c", conv.id)
    assert store.get("c2", other.id) is not None
