"""The app's gate (webui/auth.py) through AppTest: refusal on a network address, the login page,
conversations keyed by the account; and the `make run` preflight as a real subprocess.

The browser flows (cookies across a refresh, two users, throttling) are in test_e2e_accounts.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit import config
from streamlit.testing.v1 import AppTest
from test_app import ROOT, TIMEOUT, app_env, bubbles, fake_engine, send  # noqa: F401  (fixtures)

from chatglm_core.store import ConversationStore
from chatglm_core.users import UserStore


@pytest.fixture
def gate(app_env, monkeypatch):
    """Fresh accounts, sessions and throttle for each test; the server address it sets is put back."""
    from webui import auth, state

    def clear() -> None:
        for cached in (auth.users, auth.sessions, auth.throttle, state.settings):
            if hasattr(cached, "clear"):  # not when a test has put its own in place
                cached.clear()
        auth._printed.clear()
        for name in ("users.json", "sessions.sqlite3"):
            (app_env / name).unlink(missing_ok=True)

    before = config.get_option("server.address")
    clear()
    monkeypatch.delenv("CHATGLM_ALLOW_ANONYMOUS", raising=False)
    yield auth
    config.set_option("server.address", before)
    clear()


@pytest.fixture
def engine_builds(fake_engine, scripted, monkeypatch):
    """The scripted engine, counting how often the app asks for a model to be loaded."""
    from webui import state

    fake_engine(scripted)
    built = state.build_engine
    calls: list[object] = []
    monkeypatch.setattr(state, "build_engine", lambda s: calls.append(s) or built(s))
    return calls


def new_app(**query: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "main.py"), default_timeout=TIMEOUT)
    at.query_params.update(query)
    at.run()
    assert not at.exception, at.exception
    return at


def only_the_login_form(at: AppTest) -> bool:
    labels = [t.label for t in at.text_input]
    return (labels == ["Username", "Password"] and [b.label for b in at.button] == ["Log in"]
            and not at.chat_input and not at.sidebar.button and not at.sidebar.slider)


def log_in(at: AppTest, name: str, password: str) -> AppTest:
    at.text_input[0].input(name)
    at.text_input[1].input(password)
    at.button[0].click().run()
    assert not at.exception, at.exception
    return at


# --- pure decisions ------------------------------------------------------------------------------
@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("", False), (None, False), ("192.168.1.5", False), ("myhost", False),
])
def test_is_loopback(gate, address, loopback):
    assert gate.is_loopback(address) is loopback


def test_exposure_problem(gate):
    kw = dict(has_accounts=False, has_provider=False, allow_anonymous=False)
    assert gate.exposure_problem("127.0.0.1", **kw) is None
    problem = gate.exposure_problem("0.0.0.0", **kw)
    assert "0.0.0.0" in problem and "chatglm_core.users add" in problem and "CHATGLM_ALLOW_ANONYMOUS" in problem
    assert "all network interfaces" in gate.exposure_problem(None, **kw)
    for ok in ("has_accounts", "has_provider", "allow_anonymous"):
        assert gate.exposure_problem("0.0.0.0", **{**kw, ok: True}) is None


# --- the app --------------------------------------------------------------------------------------
def test_on_a_network_address_without_accounts_the_app_refuses(gate, engine_builds, capsys):
    config.set_option("server.address", "0.0.0.0")
    at = new_app()
    assert "CHATGLM_ALLOW_ANONYMOUS" in at.error[0].value and "chatglm_core.users add" in at.error[0].value
    assert not at.chat_input and not at.text_input and not at.sidebar.button
    assert engine_builds == []  # no model loaded
    assert "refuses to serve" in capsys.readouterr().err


def test_allow_anonymous_serves_with_a_warning(gate, engine_builds, capsys, monkeypatch):
    config.set_option("server.address", "0.0.0.0")
    monkeypatch.setenv("CHATGLM_ALLOW_ANONYMOUS", "1")
    at = new_app()
    assert not at.error and at.chat_input
    assert "WARNING: CHATGLM_ALLOW_ANONYMOUS" in capsys.readouterr().err


def test_on_loopback_without_accounts_nothing_changes(gate, engine_builds):
    at = new_app()
    assert at.chat_input and not at.text_input
    assert len(at.query_params["cid"][0] if isinstance(at.query_params["cid"], list) else at.query_params["cid"]) == 32


def test_with_accounts_only_the_login_form_until_logged_in(gate, app_env, engine_builds, scripted):
    UserStore(app_env / "users.json").add("alice", "correct horse")
    UserStore(app_env / "users.json").add("bob", "battery staple")
    at = new_app()
    assert only_the_login_form(at)
    assert engine_builds == []
    log_in(at, "alice", "wrong password")
    assert "Wrong username or password" in at.error[0].value and only_the_login_form(at)
    log_in(at, "Alice", "correct horse")
    assert at.chat_input and not at.text_input
    assert "alice" in at.sidebar.caption[0].value and at.sidebar.button(key="auth_logout")
    assert len(engine_builds) == 1
    scripted.enqueue("Noted, alice.")
    send(at, "alice's secret: PINEAPPLE")
    store = ConversationStore(app_env / "conversations.sqlite3")
    (conv,) = store.list("user:alice", "chat")
    assert conv.messages[0].content == "alice's secret: PINEAPPLE"
    assert "cid" not in at.query_params  # the account, not a URL, owns it

    # bob, even with whatever id he tries in the URL, sees none of it
    for query in ({}, {"cid": conv.id}, {"cid": "user:alice"}):
        other = log_in(new_app(**query), "bob", "battery staple")
        assert other.chat_input and bubbles(other) == []
        assert "PINEAPPLE" not in str([b.label for b in other.sidebar.button])
    assert store.get("user:bob", conv.id) is None

    # alice's next session (another browser) finds her conversation
    again = log_in(new_app(), "alice", "correct horse")
    assert bubbles(again)[0] == ("user", "alice's secret: PINEAPPLE")


def test_logout_forgets_the_session(gate, app_env, engine_builds, scripted):
    UserStore(app_env / "users.json").add("alice", "correct horse")
    at = log_in(new_app(), "alice", "correct horse")
    scripted.enqueue("ok")
    send(at, "hello")
    at.sidebar.button(key="auth_logout").click().run()
    assert only_the_login_form(at)
    assert "conv_chat" not in at.session_state and "auth_owner" not in at.session_state


def test_a_removed_account_is_logged_out_at_its_next_click(gate, app_env, engine_builds):
    users = UserStore(app_env / "users.json")
    users.add("alice", "correct horse")
    users.add("bob", "battery staple")
    at = log_in(new_app(), "alice", "correct horse")
    assert at.chat_input
    users.remove("alice")
    at.run()
    assert only_the_login_form(at) and "session has ended" in at.info[0].value


def test_a_sidebar_click_after_the_login_ended_changes_nothing(gate, app_env, engine_builds, scripted):
    # sidebar callbacks (Clear, delete, open, import) run before the gate: they check the login themselves
    users = UserStore(app_env / "users.json")
    users.add("alice", "correct horse")
    users.add("bob", "battery staple")
    at = log_in(new_app(), "alice", "correct horse")
    scripted.enqueue("ok")
    send(at, "keep me")
    users.remove("alice")
    at.button(key="clear_conv").click().run()
    assert only_the_login_form(at)
    kept = ConversationStore(app_env / "conversations.sqlite3").list("user:alice", "chat")
    assert [m.content for m in kept[0].messages][-2:] == ["keep me", "ok"]  # still there


def test_when_the_last_account_goes_the_session_forgets_it(gate, app_env, engine_builds, scripted):
    users = UserStore(app_env / "users.json")
    users.add("alice", "correct horse")
    at = log_in(new_app(), "alice", "correct horse")
    scripted.enqueue("ok")
    send(at, "alice's secret: MANGO")
    users.remove("alice")  # loopback, no accounts left: anonymous again, as a new browser
    at.run()
    assert at.chat_input and bubbles(at) == [] and "auth_owner" not in at.session_state
    assert "MANGO" not in str([b.label for b in at.sidebar.button])


def test_a_session_expires(gate, app_env, engine_builds, monkeypatch):
    monkeypatch.setenv("CHATGLM_SESSION_HOURS", str(1 / 3600))  # one second
    UserStore(app_env / "users.json").add("alice", "correct horse")
    at = log_in(new_app(), "alice", "correct horse")
    assert at.chat_input
    time.sleep(1.2)
    at.run()
    assert only_the_login_form(at) and "session has ended" in at.info[0].value


def test_many_wrong_passwords_lock_the_account_for_a_while(gate, app_env, engine_builds, monkeypatch):
    from chatglm_core.throttle import LoginThrottle

    throttle = LoginThrottle(free_failures=5, base_delay=60)  # a first lockout long enough for a slow machine
    monkeypatch.setattr(gate, "throttle", lambda: throttle)
    UserStore(app_env / "users.json").add("alice", "correct horse")
    at = new_app()
    for _ in range(5):
        log_in(at, "alice", "wrong password")
        assert at.error[0].value == "Wrong username or password."
    log_in(at, "alice", "wrong password")
    assert "Try again in 60 s" in at.error[0].value
    log_in(at, "alice", "correct horse")  # right, but too soon: refused without checking
    assert "Too many failed logins" in at.error[0].value and only_the_login_form(at)


def test_a_damaged_accounts_file_keeps_the_app_closed(gate, app_env, engine_builds):
    (app_env / "users.json").write_text("{damaged")
    at = new_app()
    assert "users.json" in at.error[0].value and "chatglm_core.users add" in at.error[0].value
    assert not at.chat_input and not at.text_input and engine_builds == []


# --- `make run`'s preflight -----------------------------------------------------------------------
def preflight(tmp_path: Path, address: str, **env: str) -> subprocess.CompletedProcess:
    import os

    clean = {k: v for k, v in os.environ.items() if k != "CHATGLM_ALLOW_ANONYMOUS"}
    return subprocess.run([sys.executable, "-m", "webui.auth", address], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, "CHATGLM_DATA_DIR": str(tmp_path), **env}, timeout=120)


def test_preflight_refuses_a_network_address_without_accounts(tmp_path):
    r = preflight(tmp_path, "0.0.0.0")
    assert r.returncode == 2 and "chatglm_core.users add" in r.stderr
    assert preflight(tmp_path, "127.0.0.1").returncode == 0
    r = preflight(tmp_path, "0.0.0.0", CHATGLM_ALLOW_ANONYMOUS="1")
    assert r.returncode == 0 and "WARNING" in r.stderr
    UserStore(tmp_path / "users.json").add("alice", "correct horse")
    r = preflight(tmp_path, "0.0.0.0")
    assert r.returncode == 0 and not r.stderr


# --- the API server's key and the app's accounts -------------------------------------------------
def test_the_api_key_and_the_app_accounts_are_independent(gate, app_env, engine_builds, scripted):
    import httpx
    from test_api import ThreadServer

    from chatglm_core.api.app import create_app
    from chatglm_core.engine import Engine
    from chatglm_core.settings import load_settings

    UserStore(app_env / "users.json").add("alice", "correct horse")
    api = create_app(load_settings(data_dir=app_env, api_key="the api key"), Engine(scripted))
    with ThreadServer(api) as served:
        models = served.url + "/v1/models"
        assert httpx.get(models, headers={"Authorization": "Bearer the api key"}).status_code == 200
        assert httpx.get(models, headers={"Authorization": "Bearer correct horse"}).status_code == 401
        assert httpx.get(models, auth=("alice", "correct horse")).status_code == 401
    at = log_in(new_app(), "alice", "the api key")
    assert "Wrong username or password" in at.error[0].value and only_the_login_form(at)
