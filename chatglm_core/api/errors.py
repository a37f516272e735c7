"""Every failure as OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``.

OpenAI answers a malformed request with 400 (not FastAPI's 422), so schema violations, invalid
JSON and our own `RequestError`s all become 400 ``invalid_request_error``s naming the field at
fault. Our bugs and backend failures are 500 ``server_error``s; nothing leaves as a bare traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from chatglm_core.errors import ConfigError, GenerationError, RequestError

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_exceeded"}


def error_body(message: str, status: int = 400, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else _TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(message: str, status: int = 400, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


def from_exception(e: Exception) -> JSONResponse:
    """The response for an error raised while serving a request."""
    if isinstance(e, RequestError):
        return error_response(str(e), e.status, e.param, e.code)
    if isinstance(e, (GenerationError, ConfigError)):
        log.error("request failed: %s", e)
        return error_response(str(e), 500, code="generation_error" if isinstance(e, GenerationError) else None)
    log.exception("unexpected error while serving a request")
    return error_response(f"internal error: {type(e).__name__}: {e}", 500)


#: Names pydantic puts in an error's location for the member of a union it tried ("stop.str",
#: "tool_choice.literal['none','auto','required']", "content.list[TextPart]", "NamedToolChoice"):
#: not part of the request's path, so not part of OpenAI's `param`.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "bytes", "none"}


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or part[:1].isupper() or any(c in part for c in "[(',"))


def _loc(loc: tuple[Any, ...], body: Any = None) -> str:
    """The request path of a pydantic error location: union member names dropped, and so is a
    discriminated union's tag, recognised by walking the request body along the path: the tag is
    the object's "type" value, where it is no key of the object or is followed by the key of the
    same name ("response_format.json_schema.json_schema.name" is response_format.json_schema.name)."""
    parts = [p for p in loc if p != "body"]
    out, node, tagged = "", body, None
    for i, p in enumerate(parts):
        is_dict = isinstance(node, dict)
        in_body = is_dict and p in node or isinstance(node, list) and isinstance(p, int)
        tag = is_dict and tagged is not node and node.get("type") == p and (not in_body or parts[i + 1:i + 2] == [p])
        if tag:
            tagged = node  # one tag per object
            continue
        if not in_body and _is_type_tag(p):
            continue
        out += f"[{p}]" if isinstance(p, int) else (("." if out else "") + str(p))
        node = node[p] if in_body and (is_dict or -len(node) <= p < len(node)) else None
    return out


def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
    if first.get("type") == "json_invalid":
        return error_response("We could not parse the JSON body of your request: send valid JSON with "
                              "Content-Type: application/json.", 400, code="invalid_json")
    body = getattr(exc, "body", None)
    param = _loc(tuple(first.get("loc", ())), body) or None
    if param is None:
        return error_response("The request body must be a JSON object, sent with Content-Type: application/json.",
                              400, code=str(first.get("type")))
    lines = list(dict.fromkeys(f"{_loc(tuple(e.get('loc', ())), body) or 'body'}: {e.get('msg')}" for e in errors))
    detail = "; ".join(lines[:5])
    more = f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""
    return error_response(f"Invalid request: {detail}{more}", 400, param, code=str(first.get("type")))


def _http(request: Request, exc: HTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"Unknown path {request.url.path}: see /docs for the endpoints"
    return error_response(message, exc.status_code, headers=getattr(exc, "headers", None))


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(RequestError, lambda r, e: from_exception(e))  # type: ignore[arg-type]
    app.add_exception_handler(Exception, lambda r, e: from_exception(e))
