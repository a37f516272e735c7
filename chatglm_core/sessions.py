"""Login sessions: an opaque random token in the browser, its hash, account and expiry in sqlite here.

Why rows on the server rather than a self-contained signed token: logging out, a new password and a
removed account must end a session at once and for good (a signed token stays valid until it expires
unless the server keeps a list of revoked ones anyway). The browser holds 256 random bits
(`secrets.token_urlsafe`); the table holds only their SHA-256 (a copy of the file gives no usable
token; a fast hash suffices for random tokens, unlike passwords). A session also remembers its
account's tag (chatglm_core.users): when the password changes or the account goes, the tag no longer
matches and the session is over. The file is `<data dir>/sessions.sqlite3`, mode 0600.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SESSIONS_FILE = "sessions.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    tag TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Session:
    user: str
    tag: str
    expires_at: float


class SessionStore:
    def __init__(self, path: Path | str, ttl_seconds: float) -> None:
        self.path = Path(path)
        self.ttl_seconds = ttl_seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # 0600 before sqlite creates it 0644
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @classmethod
    def from_settings(cls, settings: Any) -> SessionStore:
        return cls(Path(settings.data_dir) / SESSIONS_FILE, settings.session_hours * 3600)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def issue(self, user: str, tag: str) -> str:
        """A new session for `user`; the token the browser keeps (shown nowhere else)."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self._connect() as db:
            db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))  # tidy as we go
            db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (_digest(token), user, tag, now + self.ttl_seconds))
        return token

    def get(self, token: str) -> Session | None:
        """The live session behind `token`, or None (unknown, revoked or expired)."""
        if not token:
            return None
        with self._connect() as db:
            row = db.execute("SELECT user, tag, expires_at FROM sessions WHERE token_hash = ?",
                             (_digest(token),)).fetchone()
        if row is None or row[2] <= time.time():
            return None
        return Session(*row)

    def user_for(self, token: str, tag_of: Callable[[str], str | None]) -> str | None:
        """The account a token logs in, if its session is live and the account's tag still matches."""
        s = self.get(token)
        if s is None or tag_of(s.user) != s.tag:
            return None
        return s.user

    def revoke(self, token: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM sessions WHERE token_hash = ?", (_digest(token),))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
