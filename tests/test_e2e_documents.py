"""Documents end to end in a real browser: attach a PDF in Chat mode, ask about page 3, see page 3 cited.

The server and browser helpers are test_e2e_browser's (`streamlit run main.py` + headless Chromium,
skipped with an install hint when Chromium is missing). The tiny model may answer badly: the
citation shown under its reply is what is asserted.
"""

from __future__ import annotations

import document_files as make
from test_e2e_browser import browsers, css, idle, messages, pytestmark, send, server, shot, wait_for  # noqa: F401

FACT = "The treaty was signed at Quillbridge on the ninth of March by both envoys."


def upload(driver, path) -> None:
    box = wait_for(driver, lambda d: css(d, '.st-key-documents input[type="file"]')[0], "the document uploader")
    box.send_keys(str(path))


def page_text(driver) -> str:
    return driver.find_element("css selector", '[data-testid="stMain"], section.main, body').text


def test_attach_a_pdf_ask_about_page_3_and_see_it_cited(server, browsers, tmp_path):  # noqa: F811
    driver = browsers("reader")
    driver.get(server)
    wait_for(driver, lambda d: idle(d) and css(d, '[data-testid="stChatInputTextArea"]'), "the app to load")

    upload(driver, make.scanned_pdf(tmp_path / "scan.pdf"))  # a bad file first: an error, and nothing breaks
    wait_for(driver, lambda d: idle(d) and "no text layer" in page_text(d), "the scanned PDF's error")
    shot(driver, "documents-refused")

    pdf = make.pdf(tmp_path / "chronicle.pdf", make.long_pages(40, {3: FACT}))
    upload(driver, pdf)
    wait_for(driver, lambda d: idle(d) and "attached chronicle.pdf" in page_text(d), "the PDF to be attached")

    send(driver, "Where was the treaty signed?", expect=2)
    citations = '[data-testid="stChatMessage"] [data-testid="stExpander"] summary'
    summaries = wait_for(driver, lambda d: css(d, citations), "the citations under the reply")
    assert summaries[0].text.strip().endswith("[1] chronicle.pdf, page 3")
    assert "Documents: retrieval" in messages(driver)[1]
    summaries[0].click()
    wait_for(driver, lambda d: "Quillbridge" in messages(d)[1], "the cited passage's text")
    assert FACT in " ".join(messages(driver)[1].split())
    shot(driver, "documents-cited")

    driver.refresh()  # the document and its citation survive a refresh
    wait_for(driver, lambda d: idle(d) and "[1] chronicle.pdf, page 3" in " ".join(messages(d)),
             "citations after refresh")
    assert "chronicle.pdf" in page_text(driver)
