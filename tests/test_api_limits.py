"""No request stalls the others: the body-size cap (413 while reading) and a huge prompt refused before
it is tokenized, each sent beside a small request that must still be answered promptly.

Two real uvicorn servers on loopback: an in-thread app over the scripted backend for the cap's wire
behaviour, and `python -m chatglm_core.api` with the real SmolLM2 for the big-beside-small runs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from test_api import MODEL, ThreadServer, start_server, stop_server

CAP = 100_000


@pytest.fixture(scope="module")
def capped() -> Iterator[tuple[str, object]]:
    from conftest import ScriptedBackend

    from chatglm_core.api import create_app
    from chatglm_core.engine import Engine
    from chatglm_core.settings import Settings

    backend = ScriptedBackend()
    with ThreadServer(create_app(Settings(max_request_bytes=CAP), Engine(backend))) as srv:
        yield srv.url, backend


def chat_body(content: str) -> dict:
    return {"model": "scripted", "messages": [{"role": "user", "content": content}], "max_tokens": 8}


def assert_413(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert f"{CAP:,} bytes" in error["message"] and "CHATGLM_MAX_REQUEST_BYTES" in error["message"]


def test_a_body_over_the_cap_is_refused_and_the_connection_goes_on(capped):
    url, backend = capped
    backend.enqueue("Still here.")
    with httpx.Client(base_url=url, timeout=30) as http:
        assert_413(http.post("/v1/chat/completions", json=chat_body("x" * (2 * CAP))))
        # the same keep-alive connection serves the next request: the refused upload was drained
        ok = http.post("/v1/chat/completions", json=chat_body("y" * (CAP // 2)))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Still here."


def test_a_chunked_upload_without_a_length_is_counted_while_it_arrives(capped):
    url, _ = capped
    sent = []

    def chunks() -> Iterator[bytes]:
        for _ in range(200):  # 200 x 10 kB = 2 MB, far past the cap
            sent.append(1)
            yield b" " * 10_000

    response = httpx.post(url + "/v1/chat/completions", content=chunks(),
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert "content-length" not in response.request.headers
    assert_413(response)


def test_the_openai_client_sees_openais_error_shape(capped):
    url, _ = capped
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "z" * (2 * CAP)}])
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"


# --- the real model: a huge request beside a small one ----------------------------------------
@pytest.fixture(scope="module")
def real_server() -> Iterator[str]:
    # one thread per step: this measures stalls, not speed, and on a busy machine every step of a
    # multi-threaded one waits for a core (see the README's CHATGLM_THREADS row)
    proc, url = start_server("--max-request-bytes", str(16 * 2**20), "--threads", "1")
    yield url
    stop_server(proc)


def ask_small(url: str) -> tuple[float, str]:
    """(seconds, reply) of a one-line question."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of "
                                                                                         "France?"}],
                                       max_tokens=8, temperature=0)
    return time.perf_counter() - t0, r.choices[0].message.content


def big_beside_small(url: str, big_content_bytes: int) -> tuple[httpx.Response, float, float, str, float]:
    """Send a huge one-message request, then (once its upload is under way) a one-line one. Returns
    (the big one's response, its seconds, the small one's seconds and reply, the small one's seconds alone)."""
    alone = min(ask_small(url)[0] for _ in range(2))  # warm: the first request pays one-time costs
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hello " * (big_content_bytes // 6)}],
                       "max_tokens": 8}).encode()
    box: dict = {}

    def big() -> None:
        t0 = time.perf_counter()
        box["big"] = httpx.post(url + "/v1/chat/completions", content=body,
                                headers={"Content-Type": "application/json"}, timeout=120)
        box["big_s"] = time.perf_counter() - t0

    t = threading.Thread(target=big)
    t.start()
    time.sleep(1.0)  # the big request is uploaded and in the server's hands
    small_s, reply = ask_small(url)
    t.join()
    return box["big"], box["big_s"], small_s, reply, alone


def assert_prompt(small_s: float, alone: float, reply: str) -> None:
    # generous: parsing the big body holds the event loop a moment; tokenizing it held the model for 12 s+
    assert "Paris" in reply
    assert small_s < 2 * alone + 5, f"the small request took {small_s:.1f} s beside the big one, {alone:.1f} s alone"


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing_and_stalls_nobody(real_server):
    # 12 MB of "Hello " is 2 M tokens: tokenized on the batch loop it held every other request ~12 s
    big, big_s, small_s, reply, alone = big_beside_small(real_server, 12 * 2**20)
    assert big.status_code == 400, big.text[:500]
    error = big.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "characters" in error["message"] and "context window" in error["message"]
    assert_prompt(small_s, alone, reply)
    assert big_s < 15.0, f"the big request took {big_s:.1f} s to be refused"


def test_a_body_over_the_cap_beside_a_small_request(real_server):
    big, big_s, small_s, reply, alone = big_beside_small(real_server, 40 * 2**20)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert_prompt(small_s, alone, reply)
    assert big_s < 15.0, f"the big request took {big_s:.1f} s to be refused"
