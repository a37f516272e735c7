"""The web app's accounts: names and argon2id password hashes in one file under the data dir.

    python -m chatglm_core.users add NAME      # asks for the password (or reads a line from stdin)
    python -m chatglm_core.users passwd NAME   # a new password; the account's sessions end
    python -m chatglm_core.users remove NAME   # the account's sessions end; its conversations stay
    python -m chatglm_core.users list

Hashing is argon2-cffi's `PasswordHasher` (argon2id, its RFC 9106 defaults), not hand-written. The file
(`<data dir>/users.json`, mode 0600) is replaced atomically: a temp file in the same directory, fsync,
`os.replace`, so a reader (the app re-reads it when it changes) never sees half a file. Each account
has a `tag` that changes with its password: a session remembers the tag it was issued under, so a new
password or a removed account ends every session of it (see chatglm_core.sessions). Knows nothing of
Streamlit; `webui/auth.py` is the app's side.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from chatglm_core.errors import ConfigError

USERS_FILE = "users.json"
MIN_PASSWORD_CHARS = 8
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.@-]{0,63}$")
_hasher = PasswordHasher()
# verified against when the name is unknown, so a wrong name costs the same time as a wrong password
_DUMMY_HASH = _hasher.hash("not a real password")


def normalize_name(name: str) -> str:
    """The account name as stored (lower case); ConfigError saying what is allowed otherwise."""
    clean = name.strip().lower()
    if not _NAME.match(clean):
        raise ConfigError(f"invalid account name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-', "
                          "starting with a letter or digit")
    return clean


class UserStore:
    """The accounts file. Safe to share between threads; re-read whenever the file changes on disk."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_settings(cls, settings: Any) -> UserStore:
        return cls(Path(settings.data_dir) / USERS_FILE)

    # --- reading -------------------------------------------------------------------------------
    def _load(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                self._stamp, self._users = None, {}
                return self._users
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._users, self._stamp = _read(self.path), stamp
            return self._users

    def names(self) -> list[str]:
        return sorted(self._load())

    def __bool__(self) -> bool:  # "are there any accounts?" is the question the app asks
        return bool(self._load())

    def tag(self, name: str) -> str | None:
        """The account's current tag (changes with its password); None if there is no such account."""
        user = self._load().get(name)
        return user["tag"] if user else None

    def verify(self, name: str, password: str) -> str | None:
        """The account's tag if the password is right, else None (same cost for an unknown name)."""
        try:
            name = normalize_name(name)
        except ConfigError:
            name = ""
        user = self._load().get(name)
        try:
            _hasher.verify(user["hash"] if user else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            return None
        return user["tag"] if user else None

    # --- changing ------------------------------------------------------------------------------
    def add(self, name: str, password: str, *, replace: bool = False) -> str:
        """Create the account (or, with replace, set a new password); returns the stored name."""
        name = normalize_name(name)
        if len(password) < MIN_PASSWORD_CHARS:
            raise ConfigError(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
        users = dict(self._load())
        if name in users and not replace:
            raise ConfigError(f"account {name!r} exists: use `passwd {name}` to set a new password")
        if name not in users and replace:
            raise ConfigError(f"no account {name!r}: use `add {name}` to create it")
        created = users.get(name, {}).get("created", time.time())
        users[name] = {"hash": _hasher.hash(password), "tag": secrets.token_hex(8), "created": created}
        self._write(users)
        return name

    def remove(self, name: str) -> None:
        name = normalize_name(name)
        users = dict(self._load())
        if users.pop(name, None) is None:
            raise ConfigError(f"no account {name!r} (see `list`)")
        self._write(users)

    def _write(self, users: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".users-", dir=self.path.parent)  # mkstemp creates it 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "users": users}, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            self._stamp = None  # re-read on next use


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        users = data["users"]
        if not isinstance(users, dict) or not all(isinstance(u, dict) and {"hash", "tag"} <= u.keys()
                                                  for u in users.values()):
            raise ValueError("each account needs 'hash' and 'tag'")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"the accounts file {path} is unreadable ({e}): fix or delete it, then add the "
                          "accounts again with `python -m chatglm_core.users add NAME`") from None
    return users


# --- the command line --------------------------------------------------------------------------
def read_password(prompt: str = "Password: ") -> str:
    """From the terminal (asked twice, not echoed), else the first line of standard input."""
    if sys.stdin.isatty():
        first = getpass.getpass(prompt)
        if getpass.getpass("Again: ") != first:
            raise ConfigError("the two passwords differ: nothing changed")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def main(argv: list[str] | None = None) -> int:
    from chatglm_core.settings import load_settings

    p = argparse.ArgumentParser(prog="python -m chatglm_core.users", description="Manage the web app's accounts.")
    p.add_argument("--data-dir", help="default: CHATGLM_DATA_DIR, else ./data")
    sub = p.add_subparsers(dest="command", required=True)
    for cmd, what in (("add", "create an account"), ("passwd", "set a new password"), ("remove", "delete an account")):
        sub.add_parser(cmd, help=what).add_argument("name")
    sub.add_parser("list", help="the account names")
    args = p.parse_args(argv)
    try:
        store = UserStore.from_settings(load_settings(data_dir=args.data_dir))
        if args.command == "list":
            print("\n".join(store.names()) if store else f"no accounts in {store.path}")
        elif args.command == "remove":
            store.remove(args.name)
            print(f"removed {normalize_name(args.name)}; their sessions have ended")
        else:
            name = normalize_name(args.name)
            store.add(name, read_password(f"Password for {name}: "), replace=args.command == "passwd")
            print(f"{'created' if args.command == 'add' else 'updated'} {name} in {store.path}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
