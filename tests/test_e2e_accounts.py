"""Accounts end to end: `streamlit run main.py --server.address 0.0.0.0` reached through 127.0.0.1, in
headless Chromium, with two accounts made by the real command line.

Without logging in there is nothing but the login form (no chat input, no model loaded, no kernel);
a login survives a refresh (the session cookie) and ends with Log out; one user never sees the other's
conversation, whatever URL or id they open; the code interpreter's kernel belongs to the account;
wrong passwords lock the name and the client out for a growing while. And with no accounts the app
on 0.0.0.0 refuses to serve. Helpers and the skip come from test_e2e_browser.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_e2e_browser import (CHROMEDRIVER, ROOT, WAIT, browsers, css, free_port, idle, messages,  # noqa: F401
                              pytestmark, send, shot, wait_for)

from chatglm_core.store import ConversationStore

PASSWORDS = {"alice": "alice's long password", "bob": "bob's long password"}


def start_app(data: Path, log_path: Path, test_data_dir: Path, address: str = "0.0.0.0", port: int | None = None,
              extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL_PATH", "CHATGLM_MODEL_PATH", "CHATGLM_TOOLS", "CHATGLM_BACKEND", "CHATGLM_GGUF_WEIGHTS",
                        "CHATGLM_ALLOW_ANONYMOUS")}
    env.update(CHATGLM_DATA_DIR=str(data), CHATGLM_CACHE_DIR=str(test_data_dir / "cache"), CHATGLM_DEVICE="cpu",
               CHATGLM_TEMPERATURE="0", CHATGLM_MAX_NEW_TOKENS="8")
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "main.py", "--server.port", str(port), "--server.headless", "true",
         "--server.address", address, *(extra or [])], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT
    while True:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"streamlit did not come up; see {log_path}")
        time.sleep(0.5)


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory, test_data_dir):
    data = tmp_path_factory.mktemp("accounts-data")
    for name, password in PASSWORDS.items():  # the real command, the password on stdin
        r = subprocess.run([sys.executable, "-m", "chatglm_core.users", "--data-dir", str(data), "add", name],
                           input=password + "\n", capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
    log = tmp_path_factory.mktemp("accounts-log") / "streamlit.log"
    proc, url = start_app(data, log, test_data_dir)
    yield url, proc, data, log
    stop_app(proc)


# --- what the server process has done -----------------------------------------------------------
def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def kernels_started(proc: subprocess.Popen, data: Path) -> bool:
    return (data / "sandboxes").exists() or bool(descendants(proc.pid))


def model_loaded(proc: subprocess.Popen) -> bool:
    """Whether the server has loaded the model: llama.cpp's library is in its memory (llama_cpp is imported
    only to load a model, whose weights it reads into memory by default, CHATGLM_LLAMA_LOAD) or it has the
    weights mapped (a mapped .gguf, transformers' safetensors)."""
    maps = Path(f"/proc/{proc.pid}/maps").read_text()
    return bool(re.search(r"(/libllama\.so[.\d]*|\.gguf|\.safetensors)\s*$", maps, re.M))


# --- page helpers ---------------------------------------------------------------------------------
def settled(driver) -> bool:
    """The script run has finished (pages without a title, unlike test_e2e_browser.idle)."""
    app = css(driver, '[data-testid="stApp"]')
    return bool(app) and app[0].get_attribute("data-test-script-state") == "notRunning"


def alert(driver) -> str:
    shown = css(driver, '[data-testid="stAlert"]')
    return settled(driver) and bool(shown) and shown[0].text.strip()


def login_form(driver) -> bool:
    return bool(idle(driver) and css(driver, 'input[aria-label="Username"]')
                and css(driver, 'input[aria-label="Password"]'))


def chat_ready(driver) -> bool:
    return bool(idle(driver) and css(driver, '[data-testid="stChatInputTextArea"]'))


def page_text(driver) -> str:
    return driver.find_element("css selector", '[data-testid="stApp"]').text


def log_in(driver, name: str, password: str) -> None:
    """Fill the form and press Log in; `ran(driver)` then says whether the click's run has finished."""
    from selenium.webdriver.common.keys import Keys

    wait_for(driver, login_form, "the login form")
    for label, value in (("Username", name), ("Password", password)):
        box = css(driver, f'input[aria-label="{label}"]')[0]
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(value)
    # count script runs from here on, so the previous attempt's error is not taken for this one's
    driver.execute_script("""
        const app = document.querySelector('[data-testid="stApp"]');
        window.__runs = 0;
        new MutationObserver(() => {
            if (app.getAttribute('data-test-script-state') === 'running') window.__runs++;
        }).observe(app, {attributes: true, attributeFilter: ['data-test-script-state']});""")
    next(b for b in css(driver, "button") if b.text.strip() == "Log in").click()


def ran(driver) -> bool:
    return bool(driver.execute_script("return window.__runs || 0") >= 1 and idle(driver))


def log_in_and_wait(driver, name: str) -> None:
    log_in(driver, name, PASSWORDS[name])
    wait_for(driver, chat_ready, f"{name}'s chat")


def failed_login(driver, name: str, password: str) -> str:
    """Log in expecting a refusal; the error it shows: once the click's run has finished, or as soon as
    the error differs from the one before the click (a full suite once left the run counter at 0 while
    the page showed the new error)."""
    wait_for(driver, login_form, "the login form")
    shown = css(driver, '[data-testid="stAlert"]')
    before = shown[0].text.strip() if shown else ""
    log_in(driver, name, password)

    def error(d):
        if not login_form(d):
            return ""
        now = alert(d)
        return now if now and (ran(d) or now != before) else ""

    return wait_for(driver, error, "a login error")


def open_page(driver, title: str) -> None:
    links = css(driver, '[data-testid="stSidebarNavLink"]')
    next(a for a in links if a.text.strip().splitlines()[-1] == title).click()
    wait_for(driver, lambda d: idle(d) and any(h.text.strip() == title for h in css(d, "h1")), f"the {title} page")


# --- the tests ------------------------------------------------------------------------------------
def test_two_accounts_in_the_browser(server, browsers):
    url, proc, data, _ = server

    # 1. not logged in: the login form and nothing else, whichever page is asked for
    anon = browsers("anon")
    for path in ("/", "/code_interpreter", "/?cid=" + "0" * 32):
        anon.get(url + path)
        wait_for(anon, login_form, f"the login form at {path}")
        buttons = css(anon, 'button:not([data-testid="stTextInput"] button)')  # not the password's eye
        assert [b.text.strip() for b in buttons] == ["Log in"]
        assert not css(anon, '[data-testid="stChatInputTextArea"]')
        assert not css(anon, '[data-testid="stSidebarNavLink"]')
    shot(anon, "accounts-login-form")
    assert not kernels_started(proc, data) and not model_loaded(proc)

    # 2. alice logs in and chats; a refresh keeps her logged in (the session cookie) and her conversation
    alice = browsers("alice")
    alice.get(url)
    log_in_and_wait(alice, "alice")
    shown = send(alice, "My secret word is PINEAPPLE.", expect=2)
    assert "cid=" not in alice.current_url
    assert model_loaded(proc)  # the check above could have seen a loaded model
    alice.refresh()
    wait_for(alice, lambda d: chat_ready(d) and messages(d) == shown, "alice's conversation after a refresh")
    assert not login_form(alice)
    cookie = alice.get_cookie("chatglm_session_" + url.rsplit(":", 1)[1])
    assert cookie["sameSite"] == "Strict" and cookie["value"] not in alice.current_url
    (conv,) = ConversationStore(data / "conversations.sqlite3").list("user:alice", "chat")

    # 3. bob, with alice's URL, her conversation's id or her account's id in the URL, sees none of it
    bob = browsers("bob")
    bob.get(alice.current_url)
    log_in_and_wait(bob, "bob")
    for path in ("", "/?cid=" + conv.id, "/?cid=user:alice", "/?cid=user%3Aalice"):
        bob.get(url + path)
        wait_for(bob, chat_ready, f"bob's chat at {path or '/'}")
        assert messages(bob) == [] and "PINEAPPLE" not in page_text(bob)
    shot(bob, "accounts-bob")

    # 4. the code interpreter's kernel belongs to the account: alice starts one, her second browser
    #    finds it running, bob has none
    open_page(alice, "Code Interpreter")
    next(b for b in css(alice, "button") if b.text.strip().endswith("Restart")).click()
    wait_for(alice, lambda d: idle(d) and list((data / "sandboxes").glob("sb-*")), "alice's kernel")
    alice2 = browsers("alice2")
    alice2.get(url)
    log_in_and_wait(alice2, "alice")
    assert messages(alice2) == shown  # her history, in a browser she never used before
    open_page(alice2, "Code Interpreter")
    wait_for(alice2, lambda d: idle(d) and "Isolation:" in page_text(d), "alice's kernel in her other browser")
    open_page(bob, "Code Interpreter")
    assert "Isolation:" not in page_text(bob)
    assert len(list((data / "sandboxes").glob("sb-*"))) == 1  # one kernel for alice's two browsers, none for bob

    # 5. log out: the login form, also after a refresh
    next(b for b in css(alice, "button") if b.text.strip().endswith("Log out")).click()
    wait_for(alice, login_form, "the login form after logging out")
    wait_for(alice, lambda d: d.get_cookie(cookie["name"]) is None, "the session cookie to go")
    alice.refresh()
    wait_for(alice, login_form, "the login form after logging out and a refresh")
    alice2.refresh()  # her other browser has its own session: still logged in
    wait_for(alice2, lambda d: idle(d) and "Isolation:" in page_text(d), "alice's other browser after her logout")


def test_wrong_passwords_are_slowed_down(server, browsers):
    url, *_ = server
    driver = browsers("guesser")
    driver.get(url)
    for _ in range(5):  # the first five are free
        assert failed_login(driver, "alice", "guess") == "Wrong username or password."
    for delay in (1, 2, 4, 8, 16):  # then a lockout after each, doubling
        message = failed_login(driver, "alice", "guess")
        assert message == f"Wrong username or password. Try again in {delay} s."
        if delay < 16:
            time.sleep(delay + 0.2)
    # locked: even the right password is refused, for this name and (same client) for another one; the
    # 16 s lock leaves room for two browser round trips on a slow machine (8 s ran out once in a full run)
    assert failed_login(driver, "alice", PASSWORDS["alice"]).startswith("Too many failed logins")
    # a refusal inside the lock is too quick for the page to show its run (no password is hashed), so
    # the same "try again in 15 s." would not tell the two attempts apart: a second later it says 14 s
    time.sleep(1.1)
    assert failed_login(driver, "bob", PASSWORDS["bob"]).startswith("Too many failed logins")
    shot(driver, "accounts-locked")
    time.sleep(16.2)
    log_in_and_wait(driver, "alice")


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, test_data_dir):
    data = tmp_path_factory.mktemp("no-accounts-data")
    log = tmp_path_factory.mktemp("no-accounts-log") / "streamlit.log"
    proc, url = start_app(data, log, test_data_dir)
    yield url, proc, data, log
    stop_app(proc)


def test_on_0000_without_accounts_the_app_refuses(open_server, browsers):
    url, proc, data, log = open_server
    driver = browsers("refused")
    driver.get(url)
    error = wait_for(driver, alert, "the refusal")
    assert "CHATGLM_ALLOW_ANONYMOUS" in error and "chatglm_core.users add" in error
    assert not css(driver, '[data-testid="stChatInputTextArea"]') and not css(driver, "input")
    shot(driver, "accounts-refused")
    assert not kernels_started(proc, data) and not model_loaded(proc)
    assert "refuses to serve" in log.read_text()


@pytest.fixture(scope="module")
def local_server(tmp_path_factory, test_data_dir):
    data = tmp_path_factory.mktemp("local-data")
    log = tmp_path_factory.mktemp("local-log") / "streamlit.log"
    proc, url = start_app(data, log, test_data_dir, address="127.0.0.1")
    yield url, proc
    stop_app(proc)


def test_on_loopback_without_accounts_another_host_name_is_refused(local_server, tmp_path):
    """DNS rebinding: a web site that points its own name at 127.0.0.1 must not drive the anonymous app."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    url, proc = local_server
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--host-resolver-rules=MAP rebind.test 127.0.0.1", f"--user-data-dir={tmp_path / 'rebind'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(WAIT)
        driver.get(url.replace("127.0.0.1", "rebind.test"))
        error = wait_for(driver, alert, "the refusal")
        assert "rebind.test" in error and "CHATGLM_ALLOW_ANONYMOUS" in error
        assert not css(driver, '[data-testid="stChatInputTextArea"]')
        shot(driver, "accounts-rebinding-refused")
        for same in (url, url.replace("127.0.0.1", "localhost")):  # the machine's own names: the app as before
            driver.get(same)
            wait_for(driver, chat_ready, f"the anonymous app at {same}")
    finally:
        driver.quit()
