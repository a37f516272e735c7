"""Schemathesis fuzzing of the OpenAI-compatible API from its own /openapi.json.

Every operation gets generated requests, valid and invalid by the document. Checks: no 5xx, every
4xx in OpenAI's error shape, schema-invalid bodies rejected, responses as documented, and the
server still healthy afterwards.

- quick (`make test`): the app in-process over `AnswerBackend`, FUZZ_EXAMPLES (100) per operation;
- slow (`make soak`): `python -m chatglm_core.api` with the real SmolLM2 on loopback,
  FUZZ_EXAMPLES_SLOW (300) per operation. max_tokens/n are clamped so each request stays short.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from reliability_support import answer_app, assert_openai_error
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
EXAMPLES_SLOW = int(os.environ.get("FUZZ_EXAMPLES_SLOW", "300"))
HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
          HealthCheck.function_scoped_fixture]
REAL_MODEL = "SmolLM2-135M-Instruct"
EMBEDDER = "all-MiniLM-L6-v2"
KEY = "sk-fuzz"  # the servers require it: the fuzzer also tries requests without it
STATS: dict[str, dict[int, int]] = {}


def openai_errors(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx carries OpenAI's error object."""
    if 400 <= response.status_code < 500:
        assert_openai_error(response.status_code, response.json())
    return None


CHECKS = [not_a_server_error, openai_errors, negative_data_rejection, response_schema_conformance,
          content_type_conformance, status_code_conformance]


def steer(body: Any, chat_model: str, max_tokens: int) -> Any:
    """Most generated bodies get a served model name (random names only ever reach the 404), and
    generation lengths are clamped so a valid request costs at most `max_tokens` tokens per choice."""
    if not isinstance(body, dict):
        return body
    if isinstance(body.get("model"), str) and hash(body["model"]) % 5:
        body["model"] = chat_model if "messages" in body else EMBEDDER
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and body[key] > max_tokens:
            body[key] = max_tokens
    if isinstance(body.get("n"), int) and body["n"] > 2:
        body["n"] = 2
    if isinstance(body.get("input"), list) and len(body["input"]) > 4:
        body["input"] = body["input"][:4]
    if isinstance(body.get("messages"), list) and len(body["messages"]) > 6:
        body["messages"] = body["messages"][:6]
    return body


def record(operation: str, status: int) -> None:
    STATS.setdefault(operation, {}).setdefault(status, 0)
    STATS[operation][status] += 1


@pytest.fixture(scope="module", autouse=True)
def report_stats() -> Iterator[None]:
    STATS.clear()
    yield
    for op, counts in sorted(STATS.items()):
        print(f"\nfuzz {op}: {sum(counts.values())} requests, statuses {dict(sorted(counts.items()))}")


# --- quick: in-process, any-reply backend ------------------------------------------------------
def stub_embed(self, texts, dimensions=None):
    """The real embedder is tested in test_api.py; the quick fuzz checks request handling only."""
    import numpy as np

    from chatglm_core.errors import RequestError

    if dimensions is not None and dimensions != 4:
        raise RequestError("this embedder makes 4-dimensional vectors", param="dimensions")
    return [np.ones(4, dtype="float32") / 2 for _ in texts], len(texts)


def fuzz(schema: Any, call: Any, chat_model: str, max_tokens: int, examples: int, label: str) -> None:
    """`examples` generated cases per operation (half valid, half invalid by the document)."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.core.parameters import ParameterLocation

    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/embeddings", "/v1/models/{model}"}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=max(1, examples // 2), deadline=None, suppress_health_check=HEALTH,
                      database=None)
            @given(case=op.as_strategy(mode))
            def one(case: Any) -> None:
                if case.body is not None and not isinstance(case.body, type(schemathesis.core.NOT_SET)):
                    case.body = steer(case.body, chat_model, max_tokens)
                if case.path_parameters and hash(case.path_parameters.get("model")) % 2:
                    case.path_parameters = {**case.path_parameters, "model": chat_model}
                headers = case.meta.components.get(ParameterLocation.HEADER) if case.meta else None
                if headers is None or headers.mode is not GenerationMode.NEGATIVE:
                    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {KEY}"}
                response = call(case)
                record(f"{label} {case.method} {case.path}", response.status_code)
                case.validate_response(response, checks=CHECKS)

            try:
                one()
            except Unsatisfiable:  # an operation without inputs has no invalid requests
                assert mode is GenerationMode.NEGATIVE and not (op.body or op.path_parameters or op.query), op.path


# --- quick: in-process, any-reply backend ------------------------------------------------------
def stub_embed(self, texts, dimensions=None):
    """The real embedder is tested in test_api.py; the quick fuzz checks request handling only."""
    import numpy as np

    from chatglm_core.errors import RequestError

    if dimensions is not None and dimensions != 4:
        raise RequestError("this embedder makes 4-dimensional vectors", param="dimensions")
    return [np.ones(4, dtype="float32") / 2 for _ in texts], len(texts)


def test_fuzz_in_process(monkeypatch):
    from fastapi.testclient import TestClient

    from chatglm_core.api import embeddings

    monkeypatch.setattr(embeddings.Embedder, "embed", stub_embed)
    app, backend = answer_app(api_key=KEY)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    fuzz(schema, lambda case: case.call(), backend.model_name, 4, EXAMPLES, "in-process")
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:  # still serving
        assert c.get("/health").status_code == 200
        r = c.post("/v1/chat/completions", json={"model": "answer-bot", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Sure thing here"
    assert backend.calls > 0  # the fuzzer reached the model, not only the validators


# --- slow: a real server with the real model --------------------------------------------------
@pytest.mark.slow
def test_fuzz_real_server():
    from test_api import start_server, stop_server

    proc, url = start_server("--api-key", KEY)
    try:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        fuzz(schema, lambda case: case.call(base_url=url, timeout=120), REAL_MODEL, 3, EXAMPLES_SLOW, "real")
        assert proc.poll() is None, "the server died"
        r = httpx.post(url + "/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"}, json={
            "model": REAL_MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 9, "temperature": 0})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        stop_server(proc)
