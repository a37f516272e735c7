"""The OpenAI-compatible HTTP server: a thin FastAPI adapter over the shared engine.

`create_app(settings, engine=None)` builds the app; without an engine it loads one from the
settings at startup. Tests and other adapters embed the app with their own engine.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Receive, Scope, Send

from chatglm_core.api import chat, errors
from chatglm_core.api.bridge import ClientGone, EngineRun
from chatglm_core.api.embeddings import Embedder, encode_vector
from chatglm_core.api.limits import BodySizeLimit
from chatglm_core.api.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)
from chatglm_core.engine import Engine
from chatglm_core.errors import RequestError, check_unicode
from chatglm_core.settings import Settings

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body over CHATGLM_MAX_REQUEST_BYTES"},
    500: {"model": ErrorResponse, "description": "Generation failed"},
}
# OpenAPI 3.1: an event stream's `schema` describes one event (its fields), not the whole body
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chat.completion.chunk, then [DONE]"}}}}}


class _ServedState:
    def __init__(self, settings: Settings, engine: Engine | None) -> None:
        self.settings = settings
        self.engine = engine
        self.embedder = Embedder(settings.embedding_path, settings.device)
        self.started = int(time.time())

    @property
    def model_name(self) -> str:
        assert self.engine is not None
        return self.settings.served_model_name or self.engine.model_name

    def chat_names(self) -> list[str]:
        aliases = [a.strip() for a in self.settings.model_aliases.split(",") if a.strip()]
        assert self.engine is not None
        return [n for n in dict.fromkeys([self.model_name, self.engine.model_name, *aliases]) if n]

    def check_model(self, name: str, names: list[str]) -> None:
        if name not in names:
            raise RequestError(f"The model {name!r} does not exist: this server serves {', '.join(map(repr, names))}",
                               param="model", status=404, code="model_not_found")


class _CancellingStream(StreamingResponse):
    """Cancels the generation however the response ends (finished, client gone, server stopping)."""

    def __init__(self, content: AsyncIterator[str], run: EngineRun) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.close()


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    state = _ServedState(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.engine is None:
            from chatglm_core.backends import load_backend

            state.engine = Engine(await anyio.to_thread.run_sync(load_backend, settings))
        yield

    app = FastAPI(title="ChatGLM workbench OpenAI-compatible API", version="1.0", lifespan=lifespan)
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)  # inside CORS: a 413 keeps its headers
    if settings.cors_origins.strip():
        from fastapi.middleware.cors import CORSMiddleware

        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    bearer = HTTPBearer(auto_error=False, description="the server's API key, when it was started with one")

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if not settings.api_key:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise RequestError("Incorrect or missing API key: send it as 'Authorization: Bearer <key>'",
                               status=401, code="invalid_api_key")

    v1 = {"dependencies": [Depends(authorize)], "responses": _ERRORS}

    @app.get("/health", response_model=Health)
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.model_name}

    @app.get("/v1/models", response_model=ModelList, **v1)
    async def list_models() -> dict[str, Any]:
        names = state.chat_names() + [state.embedder.name]
        return {"object": "list", "data": [_card(n, state.started) for n in dict.fromkeys(names)]}

    @app.get("/v1/models/{model}", response_model=ModelCard, **v1)
    async def get_model(model: str) -> dict[str, Any]:
        names = list(dict.fromkeys(state.chat_names() + [state.embedder.name]))
        state.check_model(model, names)
        return _card(model, state.started)

    @app.post("/v1/chat/completions", response_model=None,
              responses={**_ERRORS, 200: {"model": ChatCompletion, "content": _SSE,
                                          "description": "a chat.completion, or SSE chunks when stream=true"}},
              dependencies=v1["dependencies"])
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        check_unicode(req.model_dump(exclude_none=True), "")
        state.check_model(req.model, state.chat_names())
        assert state.engine is not None
        plan = chat.plan_chat(req, settings, state.engine.backend)
        try:
            if not req.stream:
                return await chat.complete(state.engine, plan, state.model_name, request)
            run, first = await chat.first_run(state.engine, plan, request)
        except ClientGone:
            return JSONResponse(errors.error_body("client closed the request", 400), status_code=400)
        return _CancellingStream(chat.stream_events(state.engine, plan, state.model_name, run, first), run)

    @app.post("/v1/embeddings", response_model=EmbeddingList, **v1)
    async def embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        check_unicode(req.model_dump(exclude_none=True), "")
        state.check_model(req.model, [state.embedder.name])
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise RequestError("'input' must not be an empty list", param="input")
        if len(texts) > 2048:
            raise RequestError("'input' may hold at most 2048 strings per request", param="input")
        vectors, tokens = await anyio.to_thread.run_sync(state.embedder.embed, texts, req.dimensions)
        data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, req.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": state.embedder.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "chatglm-workbench"}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with its 422 answers replaced by the 400s we actually send."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    for path in doc.get("paths", {}).values():
        for op in path.values():
            responses = op.get("responses", {})
            if responses.pop("422", None) is not None and "400" not in responses:
                responses["400"] = {"description": "Invalid request", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    schemas = doc.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    app.openapi_schema = doc
    return doc
