"""End to end in a real browser: `streamlit run main.py` as a subprocess, driven by headless Chromium.

Types a message in Chat mode and reads the real model's reply, switches to the other two modes,
checks that two browser sessions keep separate histories (and that a refresh keeps one's), and
that HTML typed into the chat shows as text. Screenshots go to artifacts/ (gitignored).

Needs Debian's `chromium` and `chromium-driver` (the Makefile installs them in CI); without them
the test is skipped with that instruction.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 120

pytestmark = pytest.mark.skipif(
    not (Path(CHROMEDRIVER).exists() and shutil.which("chromium")),
    reason="needs chromium + chromium-driver: apt-get install -y chromium chromium-driver",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, test_data_dir):
    port = free_port()
    data = tmp_path_factory.mktemp("e2e-data")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL_PATH", "CHATGLM_MODEL_PATH", "CHATGLM_TOOLS", "CHATGLM_BACKEND", "CHATGLM_GGUF_WEIGHTS")}
    env.update(CHATGLM_DATA_DIR=str(data), CHATGLM_CACHE_DIR=str(test_data_dir / "cache"), CHATGLM_DEVICE="cpu",
               CHATGLM_TEMPERATURE="0", CHATGLM_MAX_NEW_TOKENS="8")  # the default backend
    log = (tmp_path_factory.mktemp("e2e-log") / "streamlit.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "main.py", "--server.port", str(port), "--server.headless", "true",
         "--server.address", "127.0.0.1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not come up; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def new_browser(tmp_path: Path, name: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,900", f"--user-data-dir={tmp_path / name}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT)
    return driver


@pytest.fixture
def browsers(tmp_path):
    opened = []

    def open_one(name: str):
        opened.append(new_browser(tmp_path, name))
        return opened[-1]

    yield open_one
    for d in opened:
        d.quit()


# --- page helpers -----------------------------------------------------------------------------
def wait_for(driver, predicate, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate(driver)
            if value:
                return value
        except Exception:  # the page is re-rendering: elements come and go
            pass
        time.sleep(0.25)
    shot(driver, "timeout-" + what.replace(" ", "-"))
    raise AssertionError(f"timed out waiting for {what}")


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def messages(driver) -> list[str]:
    return [m.text.strip() for m in css(driver, '[data-testid="stChatMessage"]')]


def idle(driver) -> bool:
    """The script run has finished (no generation in flight) and the page has drawn its title."""
    app = css(driver, '[data-testid="stApp"]')
    return (bool(app) and app[0].get_attribute("data-test-script-state") == "notRunning"
            and not css(driver, ".st-key-stop") and bool(css(driver, "h1")))


def send(driver, text: str, expect: int) -> list[str]:
    from selenium.webdriver.common.keys import Keys

    box = wait_for(driver, lambda d: css(d, '[data-testid="stChatInputTextArea"]')[0], "the chat input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    return wait_for(driver, lambda d: idle(d) and len(messages(d)) >= expect and messages(d), f"{expect} messages")


def open_page(driver, title: str) -> None:
    links = css(driver, '[data-testid="stSidebarNavLink"]')
    next(a for a in links if a.text.strip().splitlines()[-1] == title).click()
    wait_for(driver, lambda d: idle(d) and any(h.text.strip() == title for h in css(d, "h1")), f"the {title} page")


def set_max_new_tokens(driver, n: int) -> None:
    from selenium.webdriver.common.keys import Keys

    next(e for e in css(driver, '[data-testid="stExpander"] summary') if "Generation" in e.text).click()
    box = wait_for(driver, lambda d: [e for e in css(d, '.st-key-gen_max_new_tokens input') if e.is_displayed()][0],
                   "the max tokens box")
    time.sleep(0.5)  # the expander's opening animation
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(n), Keys.ENTER)
    value = lambda d: css(d, '.st-key-gen_max_new_tokens input')[0].get_attribute("value")  # noqa: E731
    wait_for(driver, lambda d: idle(d) and value(d) == str(n), f"max tokens to be {n}")


def choose(driver, key: str, option: str) -> None:
    """Pick `option` in the selectbox with widget key `key`."""
    css(driver, f'.st-key-{key} input[role="combobox"]')[0].click()
    wait_for(driver, lambda d: next(o for o in css(d, '[role="option"]') if o.text.strip() == option), option).click()
    wait_for(driver, lambda d: idle(d) and css(d, f'.st-key-{key} input')[0].get_attribute("value") == option,
             f"{option} chosen")


def shot(driver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"e2e-{name}.png"))


# --- the tests --------------------------------------------------------------------------------
def test_chat_reply_modes_and_separate_sessions(server, browsers):
    alice = browsers("alice")
    alice.get(server)
    wait_for(alice, lambda d: idle(d) and css(d, '[data-testid="stChatInputTextArea"]'), "the app to load")
    assert "SmolLM2-135M-Instruct" in alice.find_element("css selector", '[data-testid="stSidebar"]').text
    shown = send(alice, "What is the capital of France?", expect=2)
    assert shown[0].endswith("What is the capital of France?")
    assert len(shown) == 2 and shown[1].strip()  # the model's reply, in its own bubble
    assert "cid=" in alice.current_url
    shot(alice, "chat")

    open_page(alice, "Tool")
    assert messages(alice) == []  # a mode of its own
    shot(alice, "tool")
    open_page(alice, "Code Interpreter")
    assert messages(alice) == []
    shot(alice, "code-interpreter")
    open_page(alice, "Chat")
    assert wait_for(alice, lambda d: messages(d) == shown, "chat history back")

    bob = browsers("bob")
    bob.get(server)
    wait_for(bob, lambda d: idle(d) and css(d, '[data-testid="stChatInputTextArea"]'), "bob's app")
    assert messages(bob) == []  # a new browser starts empty
    bob_shown = send(bob, "Tell me a fruit.", expect=2)
    assert "France" not in " ".join(bob_shown)
    shot(bob, "second-session")

    alice.refresh()  # the URL keeps alice's id: her conversation comes back, bob's does not
    wait_for(alice, lambda d: idle(d) and len(messages(d)) == 2, "alice's conversation after a refresh")
    assert messages(alice) == shown
    shot(alice, "after-refresh")


def test_html_typed_into_the_chat_is_text(server, browsers):
    driver = browsers("xss")
    driver.get(server)
    wait_for(driver, lambda d: idle(d) and css(d, '[data-testid="stChatInputTextArea"]'), "the app to load")
    payload = '<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> <b>bold?</b>'
    shown = send(driver, payload, expect=2)
    assert '<img src=x onerror="window.__xss=1">' in shown[0] and "<b>bold?</b>" in shown[0]
    assert driver.execute_script("return window.__xss") is None
    bubbles = '[data-testid="stChatMessage"]'
    assert not css(driver, f"{bubbles} img[src='x'], {bubbles} script, {bubbles} b")
    shot(driver, "html-as-text")


def test_stop_in_the_browser_keeps_the_partial_reply(server, browsers):
    from selenium.webdriver.common.keys import Keys

    driver = browsers("stopper")
    driver.get(server)
    wait_for(driver, lambda d: idle(d) and css(d, '[data-testid="stChatInputTextArea"]'), "the app to load")
    set_max_new_tokens(driver, 400)  # a long reply this time
    chat = css(driver, '[data-testid="stChatInputTextArea"]')[0]
    chat.send_keys("Write a long story about a dragon.", Keys.ENTER)
    wait_for(driver, lambda d: css(d, ".st-key-stop") and len(messages(d)) == 2 and len(messages(d)[1]) > 10,
             "the reply to start streaming", timeout=60)
    css(driver, ".st-key-stop button")[0].click()
    wait_for(driver, lambda d: idle(d) and "stopped" in d.find_element("css selector", "section.main, .main, body").text,
             "the stopped note", timeout=30)
    partial = messages(driver)[1]
    shot(driver, "stopped")
    time.sleep(2)  # a stopped generation writes nothing more
    assert messages(driver)[1] == partial
    assert len(partial.split()) < 300  # far fewer than the 400 tokens it was allowed


# --- issue 18 ----------------------------------------------------------------------------------------
def test_a_reply_cut_by_a_page_switch_is_kept_after_a_refresh(server, browsers):
    from selenium.webdriver.common.keys import Keys

    driver = browsers("switcher")
    driver.get(server)
    wait_for(driver, lambda d: idle(d) and css(d, '[data-testid="stChatInputTextArea"]'), "the app to load")
    set_max_new_tokens(driver, 400)
    css(driver, '[data-testid="stChatInputTextArea"]')[0].send_keys("Write a long story about a dragon.", Keys.ENTER)
    wait_for(driver, lambda d: css(d, ".st-key-stop") and len(messages(d)) == 2 and len(messages(d)[1]) > 20,
             "the reply to start streaming", timeout=60)
    open_page(driver, "Tool")  # the switch cuts the reply
    open_page(driver, "Chat")
    wait_for(driver, lambda d: len(messages(d)) == 2 and "stopped" in messages(d)[1], "the cut reply, marked stopped")
    reply = messages(driver)[1].splitlines()[0]
    shot(driver, "cut-by-page-switch")
    driver.refresh()  # a new session: only what was saved comes back
    wait_for(driver, lambda d: idle(d) and len(messages(d)) >= 1, "the conversation after a refresh")
    assert len(messages(driver)) == 2, messages(driver)
    assert messages(driver)[1].splitlines()[0] == reply and "stopped" in messages(driver)[1]
    shot(driver, "cut-reply-after-refresh")


def test_a_forced_tool_is_forced_for_the_first_call_only_after_a_typed_observation(server, browsers):
    driver = browsers("forced")
    driver.get(server)
    wait_for(driver, lambda d: idle(d) and css(d, '[data-testid="stChatInputTextArea"]'), "the app to load")
    open_page(driver, "Tool")
    set_max_new_tokens(driver, 48)  # room for the call's JSON
    choose(driver, "tool_choice", "ask_colleague")
    send(driver, "Ask my colleague what time the meeting is.", expect=2)
    box = wait_for(driver, lambda d: css(d, ".st-key-observation_text textarea")[0], "the observation form")
    box.send_keys("The meeting is at 3 pm.")
    next(b for b in css(driver, "button") if b.text.strip() == "Send observation").click()
    wait_for(driver, lambda d: idle(d) and len(messages(d)) >= 4, "the model's next step")
    time.sleep(1)
    page = driver.find_element("css selector", "body").text
    shot(driver, "forced-tool-after-observation")
    # forced again, the model would call ask_colleague until the round limit
    assert "kept calling tools" not in page
    assert page.count("Calling tool ask_colleague") == 1, page
