"""The request body size cap: a body over `Settings.max_request_bytes` gets a 413 in OpenAI's error
shape before the rest of it is read.

A pure ASGI middleware, because the limit must hold while the body arrives: FastAPI reads a whole
body into memory before validating it, so a check in a route (or on Content-Length alone, which a
chunked upload leaves out) would come after the 40 MB were already buffered and parsed. Starlette
and uvicorn have no such setting. A body whose declared length is too big is refused unread; one
sent without a length is counted chunk by chunk and refused as soon as it passes the cap. The body
under the cap is what the app would have buffered anyway; it is handed on whole.

The rest of a refused upload is left to uvicorn, which reads and discards it after the response
and keeps the connection: closing while the client is still sending would reset its socket, and
the client would report a broken connection instead of our 413.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatglm_core.api.errors import error_response


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, declared)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                await self.app(scope, _replay([message], receive), send)
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, declared)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}],
                                      receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, declared: int | None) -> None:
        size = f"{declared:,} bytes" if declared is not None else f"over {self.max_bytes:,} bytes"
        response = error_response(
            f"The request body is {size}, more than this server accepts ({self.max_bytes:,} bytes; "
            "CHATGLM_MAX_REQUEST_BYTES): send a shorter conversation", 413, code="request_too_large")
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that first hands out `messages`, then listens to the connection again (disconnects)."""
    async def replayed() -> Message:
        return messages.pop(0) if messages else await receive()

    return replayed
