"""The accounts file and its command line (`python -m chatglm_core.users`), with real argon2 hashing."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from chatglm_core.errors import ConfigError
from chatglm_core.users import UserStore, normalize_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> UserStore:
    return UserStore(tmp_path / "users.json")


def test_add_verify_list_remove(store: UserStore):
    assert not store and store.names() == []
    assert store.add("Alice", "correct horse") == "alice"
    store.add("bob", "battery staple")
    assert store and store.names() == ["alice", "bob"]
    tag = store.verify("alice", "correct horse")
    assert tag is not None and tag == store.tag("alice")
    assert store.verify("ALICE ", "correct horse") == tag  # names are case-insensitive
    assert store.verify("alice", "battery staple") is None
    assert store.verify("nobody", "correct horse") is None
    assert store.verify("not a name!", "x") is None
    store.remove("alice")
    assert store.names() == ["bob"] and store.tag("alice") is None


def test_the_file_is_private_hashed_and_replaced_whole(store: UserStore):
    store.add("alice", "correct horse")
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    text = store.path.read_text()
    assert "correct horse" not in text and "$argon2id$" in text
    store.add("bob", "battery staple")
    assert [p.name for p in store.path.parent.iterdir()] == ["users.json"]  # no temp file left behind
    assert set(json.loads(store.path.read_text())["users"]) == {"alice", "bob"}


def test_a_new_password_changes_the_tag(store: UserStore):
    store.add("alice", "correct horse")
    old = store.tag("alice")
    store.add("alice", "new password!", replace=True)
    assert store.verify("alice", "correct horse") is None
    assert store.verify("alice", "new password!") == store.tag("alice") != old


@pytest.mark.parametrize("call, message", [
    (lambda s: s.add("alice", "short"), "at least 8"),
    (lambda s: s.add("has space", "long enough"), "invalid account name"),
    (lambda s: s.add("", "long enough"), "invalid account name"),
    (lambda s: s.add("x" * 65, "long enough"), "invalid account name"),
    (lambda s: s.add("user:root", "long enough"), "invalid account name"),
    (lambda s: s.add("carol", "long enough", replace=True), "no account 'carol'"),
    (lambda s: s.remove("carol"), "no account 'carol'"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(store: UserStore, call, message):
    store.add("alice", "correct horse")
    before = store.path.read_bytes()
    with pytest.raises(ConfigError, match=message):
        call(store)
    assert store.path.read_bytes() == before


def test_adding_an_existing_name_says_use_passwd(store: UserStore):
    store.add("alice", "correct horse")
    with pytest.raises(ConfigError, match="passwd alice"):
        store.add("Alice", "another one")


def test_another_process_sees_changes_without_a_restart(store: UserStore):
    app_side = UserStore(store.path)
    assert not app_side
    store.add("alice", "correct horse")
    assert app_side.names() == ["alice"]
    store.remove("alice")
    assert not app_side


def test_a_damaged_file_names_itself_and_what_to_do(store: UserStore):
    store.path.write_text("{not json")
    with pytest.raises(ConfigError, match="users.json.*chatglm_core.users add"):
        store.names()


def test_normalize_name():
    assert normalize_name("  Bob.Smith@lab ") == "bob.smith@lab"
    with pytest.raises(ConfigError):
        normalize_name("-bob")


# --- the command line, as a real subprocess ---------------------------------------------------
def cli(data: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatglm_core.users", "--data-dir", str(data), *args],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_cli_reads_the_password_from_stdin(tmp_path: Path):
    r = cli(tmp_path, "add", "alice", stdin="correct horse\n")
    assert r.returncode == 0, r.stderr
    assert "created alice" in r.stdout
    assert UserStore(tmp_path / "users.json").verify("alice", "correct horse")
    r = cli(tmp_path, "list")
    assert r.returncode == 0 and r.stdout.split() == ["alice"]
    r = cli(tmp_path, "add", "alice", stdin="another one\n")
    assert r.returncode == 2 and "passwd alice" in r.stderr
    r = cli(tmp_path, "passwd", "alice", stdin="another one\n")
    assert r.returncode == 0 and UserStore(tmp_path / "users.json").verify("alice", "another one")
    r = cli(tmp_path, "add", "bob", stdin="short\n")
    assert r.returncode == 2 and "at least 8" in r.stderr
    r = cli(tmp_path, "remove", "alice")
    assert r.returncode == 0 and "removed alice" in r.stdout
    r = cli(tmp_path, "list")
    assert "no accounts" in r.stdout


def test_cli_asks_twice_on_a_terminal(tmp_path: Path):
    """A real pseudo-terminal: the password is asked for twice without echo, and must match."""
    import pty

    def run(*answers: str) -> tuple[int, str]:
        leader, follower = pty.openpty()
        p = subprocess.Popen([sys.executable, "-m", "chatglm_core.users", "--data-dir", str(tmp_path), "add", "alice"],
                             stdin=follower, stdout=follower, stderr=follower, cwd=ROOT, start_new_session=True)
        os.close(follower)
        out = b""
        for answer in answers:
            while b":" not in out.rsplit(b"\n", 1)[-1]:  # wait for the prompt
                out += os.read(leader, 1024)
            os.write(leader, answer.encode() + b"\n")
            out = out.rsplit(b"\n", 1)[0] + b"\n"
        rc = p.wait(60)
        try:
            while chunk := os.read(leader, 1024):
                out += chunk
        except OSError:  # the terminal closed with the process
            pass
        os.close(leader)
        return rc, out.decode(errors="replace")

    rc, out = run("correct horse", "something else")
    assert rc == 2 and "differ" in out
    assert not (tmp_path / "users.json").exists()
    rc, out = run("correct horse", "correct horse")
    assert rc == 0, out
    assert "correct horse" not in out  # not echoed
    assert UserStore(tmp_path / "users.json").verify("alice", "correct horse")
