"""Conversation persistence: one sqlite row per conversation, so a refresh or a restart loses nothing.

Rows belong to a *client id* (a browser's stable id, kept in the app's URL) and a *mode* ("chat",
"tools", "interpreter"). Messages are stored as one JSON list; images (PNG bytes from the code
interpreter) travel base64-encoded inside it. sqlite3 connections are opened per call, so one
store is safe to share between the app's session threads; sqlite serialises the writes.
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

    def default_title(self) -> str:
        """The first user message, shortened: what a list of conversations shows."""
        first = next((m.content for m in self.messages if m.role is Role.USER and m.content.strip()), "")
        first = " ".join(first.split())
        return first if len(first) <= TITLE_CHARS else first[: TITLE_CHARS - 1] + "…"


class ConversationStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

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
        with self._connect() as db:
            db.execute(
                "INSERT INTO conversations (id, client_id, mode, title, messages, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "title=excluded.title, messages=excluded.messages, updated_at=excluded.updated_at "
                "WHERE conversations.client_id = excluded.client_id",
                (conv.id, conv.client_id, conv.mode, conv.title, payload, conv.created_at, conv.updated_at),
            )
        return conv

    def get(self, client_id: str, conv_id: str) -> Conversation | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM conversations WHERE id = ? AND client_id = ?", (conv_id, client_id)).fetchone()
        return _row_to_conversation(row) if row else None

    def list(self, client_id: str, mode: str | None = None, limit: int = 50) -> list[Conversation]:
        """Newest first."""
        sql = "SELECT * FROM conversations WHERE client_id = ?"
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
        return cur.rowcount > 0


def _row_to_conversation(row: tuple) -> Conversation:
    conv_id, client_id, mode, title, messages, created_at, updated_at = row
    return Conversation(client_id, mode, [message_from_dict(d) for d in json.loads(messages)], title, conv_id,
                        created_at, updated_at)


# --- the JSON shape (also the app's export/import format) ------------------------------------
def message_to_dict(m: Message) -> dict[str, Any]:
    out = m.to_openai()
    if m.images:
        out["images"] = [base64.b64encode(img).decode("ascii") for img in m.images]
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
    return m


def conversation_to_json(conv: Conversation) -> str:
    return json.dumps({"title": conv.title or conv.default_title(), "mode": conv.mode,
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
    return Conversation(client_id, mode, messages, title)


def conversation_to_markdown(conv: Conversation) -> str:
    lines = [f"# {conv.title or conv.default_title() or 'Conversation'}", ""]
    for m in conv.messages:
        if m.role is Role.TOOL:
            lines += [f"**Observation ({m.name or 'tool'})**", "", "```", m.content, "```", ""]
            continue
        lines += [f"**{m.role.value.capitalize()}**", ""]
        if m.content:
            lines += [m.content, ""]
        for c in m.tool_calls:
            lines += _call_markdown(c)
    return "\n".join(lines).rstrip() + "\n"


def _call_markdown(c: ToolCall) -> list[str]:
    if c.code:
        return ["```python", c.code, "```", ""]
    return [f"Calling tool `{c.name}`:", "", "```json", json.dumps(c.arguments, ensure_ascii=False, indent=2), "```", ""]
