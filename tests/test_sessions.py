"""Login sessions: issued, looked up, expired, revoked, ended by a new password; the file holds no token."""

from __future__ import annotations

import stat
import time
from pathlib import Path

from chatglm_core.sessions import SessionStore


def test_issue_and_look_up(tmp_path: Path):
    s = SessionStore(tmp_path / "sessions.sqlite3", ttl_seconds=3600)
    token = s.issue("alice", "tag1")
    assert len(token) >= 40
    got = s.get(token)
    assert got is not None and got.user == "alice" and got.tag == "tag1"
    assert got.expires_at > time.time() + 3500
    assert s.user_for(token, {"alice": "tag1"}.get) == "alice"
    assert s.get("") is None and s.get(token + "x") is None and s.get("made-up") is None
    assert s.issue("alice", "tag1") != token  # every login its own token


def test_a_restart_keeps_sessions_and_the_file_is_private(tmp_path: Path):
    path = tmp_path / "sessions.sqlite3"
    token = SessionStore(path, ttl_seconds=3600).issue("alice", "t")
    assert SessionStore(path, ttl_seconds=3600).user_for(token, lambda name: "t") == "alice"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token.encode() not in path.read_bytes()  # only its hash is stored


def test_sessions_expire(tmp_path: Path):
    s = SessionStore(tmp_path / "sessions.sqlite3", ttl_seconds=0.3)
    token = s.issue("alice", "t")
    assert s.get(token) is not None
    time.sleep(0.4)
    assert s.get(token) is None
    assert s.user_for(token, lambda name: "t") is None


def test_logout_revokes(tmp_path: Path):
    s = SessionStore(tmp_path / "sessions.sqlite3", ttl_seconds=3600)
    a, b = s.issue("alice", "t"), s.issue("alice", "t")
    s.revoke(a)
    assert s.get(a) is None and s.get(b) is not None  # the other browser stays logged in


def test_a_new_password_or_a_removed_account_ends_the_session(tmp_path: Path):
    s = SessionStore(tmp_path / "sessions.sqlite3", ttl_seconds=3600)
    token = s.issue("alice", "old-tag")
    assert s.user_for(token, {"alice": "new-tag"}.get) is None
    assert s.user_for(token, {}.get) is None
