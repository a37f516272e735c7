"""End to end in Chromium with the real model: a conversation longer than the context window keeps
going, and the page says what the model no longer sees (issue 18). Same server and helpers as
tests/test_e2e_browser.py; replies are 8 tokens long (its settings), prompts up to the window."""

from __future__ import annotations

import re

from test_e2e_browser import browsers, css, idle, messages, pytestmark, server, shot, wait_for  # noqa: F401

SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank. "  # 14 words
SLOW = 600  # a prompt of a whole window, on 2 busy cores, on transformers too


def paste_and_send(driver, text: str, expect: int) -> list[str]:
    """Put `text` into the chat box as a paste would (typing 40,000 characters key by key takes minutes)."""
    from selenium.webdriver.common.keys import Keys

    box = wait_for(driver, lambda d: css(d, '[data-testid="stChatInputTextArea"]')[0], "the chat input")
    driver.execute_script(
        "const box = arguments[0];"
        "Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set.call(box, arguments[1]);"
        "box.dispatchEvent(new Event('input', {bubbles: true}));", box, text)
    box.send_keys(Keys.ENTER)
    return wait_for(driver, lambda d: idle(d) and len(messages(d)) >= expect and messages(d)[expect - 1].strip()
                    and messages(d), f"{expect} messages", timeout=SLOW)


def page_text(driver) -> str:
    return driver.find_element("css selector", "body").text


def test_a_conversation_longer_than_the_window_goes_on(server, browsers):
    driver = browsers("long")
    driver.get(server)
    wait_for(driver, lambda d: idle(d) and css(d, '[data-testid="stChatInputTextArea"]'), "the app to load")

    huge = SENTENCE * 430  # ~6,000 words: longer than the whole window by itself
    shown = paste_and_send(driver, huge, expect=2)
    assert len(shown[0].split()) > 5_900 and shown[1].strip()  # answered; the page keeps the message whole
    assert "Too long for the model's context window" in page_text(driver)
    shot(driver, "context-cut")

    shown = paste_and_send(driver, "Hi", expect=4)
    assert shown[3].strip()
    notice = wait_for(driver, lambda d: [i.text for i in css(d, '[data-testid="stAlert"]')
                                         if "no longer sees the 2 earliest messages" in i.text], "the notice")[0]
    window = int(re.search(r"context window \(([\d,]+) tokens", notice).group(1).replace(",", ""))
    shot(driver, "context-notice")

    # go on until the conversation holds three windows' worth of tokens (a word is at least a token)
    words, turns = len(huge.split()) + 1, 2
    while words < 3 * window:
        turns += 1
        shown = paste_and_send(driver, f"Part {turns}: " + SENTENCE * 250, expect=2 * turns)  # ~4,000 tokens
        assert shown[-1].strip() and "Generation failed" not in page_text(driver)
        words += 3_502
    assert words >= 3 * window and len(messages(driver)) == 2 * turns
    assert "no longer sees the" in page_text(driver)
    shot(driver, "context-three-windows")
