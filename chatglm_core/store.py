"""Conversation persistence: one sqlite row per conversation, so a refresh or a restart loses nothing.

Rows belong to a *client id* (a browser's stable id, kept in the app's URL) and a *mode* ("chat",
"tools", "interpreter"). Messages are stored as one JSON list; images (PNG bytes from the code
interpreter) travel base64-encoded inside it. sqlite3 connections are opened per call, so one
store is safe to share between the app's session threads; sqlite serialises the writes.

A conversation also keeps the generation settings and system prompt it was held with
(``settings``, a JSON object) and the manual tool call that waits for the user's observation
(``pending``), so a refresh restores both. Columns added after the first version are added to
an existing database when it is opened (`_migrate`); older rows read as empty.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatglm_core import store_search
from chatglm_core.errors import RequestError
from chatglm_core.messages import Message, Role, ToolCall

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    messages TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_client ON conversations (client_id, mode, updated_at);
"""

# columns added since the first schema: (name, declaration); _migrate adds any a database lacks
_ADDED_COLUMNS = (
    ("settings", "TEXT NOT NULL DEFAULT '{}'"),
    ("pending", "TEXT NOT NULL DEFAULT ''"),
    ("deleted_at", "REAL"),  # set by trash(): hidden, deleted for good by purge() (undo until then)
)
_COLUMNS = "id, client_id, mode, title, messages, created_at, updated_at, settings, pending, deleted_at"

#: The generation settings a conversation keeps, with their types (the system prompt is "system").
SETTING_TYPES: dict[str, type] = {"temperature": float, "top_p": float, "repetition_penalty": float,
                                  "max_new_tokens": int, "system": str}

TITLE_CHARS = 60


@dataclass
class Conversation:
    client_id: str
    mode: str
    messages: list[Message] = field(default_factory=list)
    title: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    updated_at: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)  # SETTING_TYPES' keys, as last used
    pending_call_id: str | None = None  # a manual tool call waiting for the user's observation
    discarded: bool = field(default=False, compare=False)  # deleted: late saves must not bring it back

    def pending_call(self) -> ToolCall | None:
        """The manual call waiting for an observation, if it is still the conversation's last step."""
        if not self.pending_call_id or not self.messages or self.messages[-1].role is not Role.ASSISTANT:
            return None
        return next((c for c in self.messages[-1].tool_calls if c.id == self.pending_call_id), None)

    def default_title(self) -> str:
        """The first user message, shortened: what a list of conversations shows."""
        first = next((m.content for m in self.messages if m.role is Role.USER and m.content.strip()), "")
        first = " ".join(first.split())
        return first if len(first) <= TITLE_CHARS else first[: TITLE_CHARS - 1] + "…"


class ConversationStore:
    def __init__(self, path: Path | str, *, full_text: bool = True) -> None:
        """`full_text=False` searches with LIKE even where FTS5 exists (as on a sqlite3 without it)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)
            _migrate(db)
            self.fts = full_text and store_search.fts_available(db)
            if self.fts:
                store_search.backfill(db)

    @classmethod
    def from_settings(cls, settings: Any) -> ConversationStore:
        return cls(Path(settings.data_dir) / "conversations.sqlite3")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:  # commits, or rolls back on error
                yield db
        finally:
            db.close()

    def save(self, conv: Conversation) -> Conversation:
        """Insert or update; an empty title is filled from the first user message."""
        conv.title = conv.title or conv.default_title()
        conv.updated_at = time.time()
        payload = json.dumps([message_to_dict(m) for m in conv.messages], ensure_ascii=False)
        settings = json.dumps(conv.settings, ensure_ascii=False)
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO conversations (id, client_id, mode, title, messages, created_at, updated_at, settings, "
                "pending) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "title=excluded.title, messages=excluded.messages, updated_at=excluded.updated_at, "
                "settings=excluded.settings, pending=excluded.pending "
                "WHERE conversations.client_id = excluded.client_id",
                (conv.id, conv.client_id, conv.mode, conv.title, payload, conv.created_at, conv.updated_at, settings,
                 conv.pending_call_id or ""),
            )
            if self.fts and cur.rowcount:
                store_search.index(db, conv.id, conv.client_id, conv.mode, conv.title, payload)
        return conv

    def get(self, client_id: str, conv_id: str) -> Conversation | None:
        with self._connect() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM conversations WHERE id = ? AND client_id = ? "
                             "AND deleted_at IS NULL", (conv_id, client_id)).fetchone()
        return _row_to_conversation(row) if row else None

    def list(self, client_id: str, mode: str | None = None, limit: int = 50) -> list[Conversation]:
        """Newest first."""
        sql = f"SELECT {_COLUMNS} FROM conversations WHERE client_id = ? AND deleted_at IS NULL"
        args: list[Any] = [client_id]
        if mode is not None:
            sql += " AND mode = ?"
            args.append(mode)
        sql += " ORDER BY updated_at DESC LIMIT ?"
        args.append(limit)
        with self._connect() as db:
            return [_row_to_conversation(r) for r in db.execute(sql, args).fetchall()]

    def delete(self, client_id: str, conv_id: str) -> bool:
        with self._connect() as db:
            cur = db.execute("DELETE FROM conversations WHERE id = ? AND client_id = ?", (conv_id, client_id))
            if self.fts and cur.rowcount:
                store_search.unindex(db, conv_id)
        return cur.rowcount > 0

    def trash(self, client_id: str, conv_id: str) -> bool:
        """Hide a conversation (get, list and search skip it) until `restore` or `purge`: an undoable delete."""
        with self._connect() as db:
            cur = db.execute("UPDATE conversations SET deleted_at = ? WHERE id = ? AND client_id = ? "
                             "AND deleted_at IS NULL", (time.time(), conv_id, client_id))
        return cur.rowcount > 0

    def restore(self, client_id: str, conv_id: str) -> bool:
        """Undo `trash`; False when the conversation was purged meanwhile."""
        with self._connect() as db:
            cur = db.execute("UPDATE conversations SET deleted_at = NULL WHERE id = ? AND client_id = ? "
                             "AND deleted_at IS NOT NULL", (conv_id, client_id))
        return cur.rowcount > 0

    def purge(self, client_id: str, older_than_s: float = 0.0) -> int:
        """Delete for good this client's trashed conversations (those trashed over `older_than_s` ago)."""
        with self._connect() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM conversations WHERE client_id = ? AND deleted_at < ?",
                                            (client_id, time.time() - older_than_s)).fetchall()]
            for conv_id in ids:
                db.execute("DELETE FROM conversations WHERE id = ? AND client_id = ?", (conv_id, client_id))
                if self.fts:
                    store_search.unindex(db, conv_id)
        return len(ids)

    def search(self, client_id: str, text: str, mode: str | None = None, limit: int = 30) -> list[Conversation]:
        """This client's conversations whose title or messages contain every word of `text`, best first."""
        with self._connect() as db:
            ids = store_search.matching_ids(db, fts=self.fts, client_id=client_id, text=text, mode=mode, limit=limit)
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            rows = db.execute(f"SELECT {_COLUMNS} FROM conversations WHERE client_id = ? AND deleted_at IS NULL "
                              f"AND id IN ({marks})", [client_id, *ids]).fetchall()
        by_id = {row[0]: _row_to_conversation(row) for row in rows}
        return [by_id[i] for i in ids if i in by_id]


def _migrate(db: sqlite3.Connection) -> None:
    """Add the columns a database made by an older version lacks (additive only: nothing is rewritten)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(conversations)")}
    for name, declaration in _ADDED_COLUMNS:
        if name not in have:
            db.execute(f"ALTER TABLE conversations ADD COLUMN {name} {declaration}")


def _row_to_conversation(row: tuple) -> Conversation:
    conv_id, client_id, mode, title, messages, created_at, updated_at, settings, pending, _deleted_at = row
    return Conversation(client_id, mode, [message_from_dict(d) for d in json.loads(messages)], title, conv_id,
                        created_at, updated_at, _settings(json.loads(settings or "{}")), pending or None)


def _settings(data: Any) -> dict[str, Any]:
    """The known settings of `data`, each of its type; raises RequestError naming a bad one."""
    if not isinstance(data, dict):
        raise RequestError("'settings' must be an object: temperature, top_p, repetition_penalty, "
                           "max_new_tokens, system")
    out: dict[str, Any] = {}
    for key, kind in SETTING_TYPES.items():
        if key not in data or data[key] is None:
            continue
        value = data[key]
        ok = isinstance(value, str) if kind is str else isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise RequestError(f"setting {key!r} must be a {kind.__name__}, got {value!r}")
        out[key] = kind(value)
    return out


# --- the JSON shape (also the app's export/import format) ------------------------------------
def message_to_dict(m: Message) -> dict[str, Any]:
    out = m.to_openai()
    if m.images:
        out["images"] = [base64.b64encode(img).decode("ascii") for img in m.images]
    if m.meta:
        out["meta"] = m.meta
    return out


def message_from_dict(d: dict[str, Any]) -> Message:
    """Raises RequestError naming the problem when the dict is not a message."""
    m = Message.from_openai(d)
    images = d.get("images") or []
    if not isinstance(images, list):
        raise RequestError("message 'images' must be a list of base64 PNG strings")
    try:
        m.images = [base64.b64decode(s, validate=True) for s in images]
    except (ValueError, TypeError):
        raise RequestError("message 'images' must be base64-encoded") from None
    meta = d.get("meta") or {}
    if not isinstance(meta, dict):
        raise RequestError("message 'meta' must be an object (how the reply ended, its tokens and timings)")
    m.meta = dict(meta)
    return m


def conversation_to_json(conv: Conversation) -> str:
    generation = {k: v for k, v in conv.settings.items() if k != "system"}
    return json.dumps({"title": conv.title or conv.default_title(), "mode": conv.mode,
                       "system": conv.settings.get("system", ""), "settings": generation,
                       "messages": [message_to_dict(m) for m in conv.messages]}, ensure_ascii=False, indent=2)


def conversation_from_json(text: str | bytes, *, client_id: str, mode: str) -> Conversation:
    """Parse an exported conversation (or a bare list of messages); raises RequestError on bad input."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the file is not valid JSON ({e}): export a conversation from this app and upload that")
    if isinstance(data, list):
        data = {"messages": data}
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise RequestError("expected a JSON object with a 'messages' list (the app's JSON export)")
    messages = [message_from_dict(d) for d in data["messages"]]
    title = data.get("title") if isinstance(data.get("title"), str) else ""
    settings = _settings({} if data.get("settings") is None else data["settings"])
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise RequestError("'system' (the system prompt) must be a string")
    if system:
        settings["system"] = system
    return Conversation(client_id, mode, messages, title, settings=settings)


_END_NOTES = {"stopped": "stopped: a partial reply", "length": "cut at the max new tokens limit"}


def conversation_to_markdown(conv: Conversation) -> str:
    lines = [f"# {conv.title or conv.default_title() or 'Conversation'}", ""]
    if system := conv.settings.get("system", "").strip():
        lines += ["**System prompt**", "", system, ""]
    for m in conv.messages:
        if m.role is Role.TOOL:
            lines += [f"**Observation ({m.name or 'tool'})**", "", "```", m.content, "```", ""]
            continue
        lines += [f"**{m.role.value.capitalize()}**", ""]
        if m.content:
            lines += [m.content, ""]
        if note := _END_NOTES.get(m.meta.get("finish", "")):
            lines += [f"*({note})*", ""]
        for c in m.tool_calls:
            lines += _call_markdown(c)
    return "\n".join(lines).rstrip() + "\n"


def _call_markdown(c: ToolCall) -> list[str]:
    if c.code:
        return ["```python", c.code, "```", ""]
    return [f"Calling tool `{c.name}`:", "", "```json", json.dumps(c.arguments, ensure_ascii=False, indent=2), "```", ""]


# --- a conversation's documents (chatglm_core.documents) --------------------------------------
_DOCUMENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    name TEXT NOT NULL,
    sections TEXT NOT NULL,
    embedding TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_by_conversation ON documents (client_id, conversation_id);
CREATE TABLE IF NOT EXISTS document_chunks (
    document_id TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    page INTEGER,
    section TEXT,
    vector BLOB NOT NULL,
    PRIMARY KEY (document_id, ordinal)
);
CREATE TABLE IF NOT EXISTS document_turns (
    client_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    message_index INTEGER NOT NULL,
    context TEXT NOT NULL,
    PRIMARY KEY (client_id, conversation_id, message_index)
);
CREATE TRIGGER IF NOT EXISTS conversation_owns_documents AFTER DELETE ON conversations BEGIN
    DELETE FROM documents WHERE conversation_id = OLD.id AND client_id = OLD.client_id;
    DELETE FROM document_turns WHERE conversation_id = OLD.id AND client_id = OLD.client_id;
END;
CREATE TRIGGER IF NOT EXISTS document_owns_chunks AFTER DELETE ON documents BEGIN
    DELETE FROM document_chunks WHERE document_id = OLD.id;
END;
"""


@dataclass
class StoredChunk:
    text: str
    page: int | None
    section: str | None
    vector: bytes  # float32, little-endian


class DocumentStore:
    """Documents attached to conversations, in the conversations' sqlite file.

    Every row carries the browser's client id and every query filters on it, so one browser never
    reads another's documents. Triggers delete a conversation's documents, chunks and per-turn
    passages with it (whichever code path deletes the conversation).
    """

    def __init__(self, conversations: ConversationStore) -> None:
        self.conversations = conversations
        with conversations._connect() as db:
            db.executescript(_DOCUMENTS_SCHEMA)

    def add(self, client_id: str, conversation_id: str, name: str, sections: list[dict[str, Any]],
            chunks: list[StoredChunk], embedding: str) -> str:
        """Store a document, its chunks and their vectors (made by the embedding model named `embedding`)."""
        doc_id = uuid.uuid4().hex
        with self.conversations._connect() as db:
            db.execute("INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (doc_id, client_id, conversation_id, name, json.dumps(sections, ensure_ascii=False), embedding,
                        time.time()))
            db.executemany("INSERT INTO document_chunks VALUES (?, ?, ?, ?, ?, ?)",
                           [(doc_id, i, c.text, c.page, c.section, c.vector) for i, c in enumerate(chunks)])
        return doc_id

    def documents(self, client_id: str, conversation_id: str) -> list[tuple[str, str, list[dict[str, Any]], str]]:
        """(id, name, sections, embedding model) of each document, oldest first."""
        with self.conversations._connect() as db:
            rows = db.execute("SELECT id, name, sections, embedding FROM documents WHERE client_id = ? AND "
                              "conversation_id = ? ORDER BY created_at", (client_id, conversation_id)).fetchall()
        return [(i, n, json.loads(s), e) for i, n, s, e in rows]

    def replace_vectors(self, client_id: str, document_id: str, vectors: list[bytes], embedding: str) -> None:
        """New vectors for a document's chunks, in order (after the embedding model changed)."""
        with self.conversations._connect() as db:
            if db.execute("UPDATE documents SET embedding = ? WHERE id = ? AND client_id = ?",
                          (embedding, document_id, client_id)).rowcount:
                db.executemany("UPDATE document_chunks SET vector = ? WHERE document_id = ? AND ordinal = ?",
                               [(v, document_id, i) for i, v in enumerate(vectors)])

    def chunks(self, client_id: str, document_id: str) -> list[StoredChunk]:
        with self.conversations._connect() as db:
            rows = db.execute("SELECT c.text, c.page, c.section, c.vector FROM document_chunks c JOIN documents d "
                              "ON d.id = c.document_id WHERE d.id = ? AND d.client_id = ? ORDER BY c.ordinal",
                              (document_id, client_id)).fetchall()
        return [StoredChunk(*r) for r in rows]

    def remove(self, client_id: str, document_id: str) -> bool:
        with self.conversations._connect() as db:
            cur = db.execute("DELETE FROM documents WHERE id = ? AND client_id = ?", (document_id, client_id))
        return cur.rowcount > 0

    def save_turn(self, client_id: str, conversation_id: str, message_index: int, context: dict[str, Any]) -> None:
        """The passages given to the model for the user message at `message_index` (for citations)."""
        with self.conversations._connect() as db:
            db.execute("INSERT OR REPLACE INTO document_turns VALUES (?, ?, ?, ?)",
                       (client_id, conversation_id, message_index, json.dumps(context, ensure_ascii=False)))

    def turns(self, client_id: str, conversation_id: str) -> dict[int, dict[str, Any]]:
        with self.conversations._connect() as db:
            rows = db.execute("SELECT message_index, context FROM document_turns WHERE client_id = ? AND "
                              "conversation_id = ?", (client_id, conversation_id)).fetchall()
        return {i: json.loads(c) for i, c in rows}
