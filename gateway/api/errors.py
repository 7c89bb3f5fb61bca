"""Errors the gateway itself produces, always in OpenAI's envelope:
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return envelope(self.message, type=self.type, code=self.code, param=self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> bytes:
        """The error as one SSE data event, for streams whose 200 status is already sent."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


ENVELOPE_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}


def error_doc(description: str) -> dict[str, Any]:
    """An OpenAPI response entry for an error in the envelope."""
    return {"description": description, "content": {"application/json": {"schema": ENVELOPE_SCHEMA}}}


def envelope(message: str, *, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def invalid_api_key(message: str) -> GatewayError:
    """401 as OpenAI answers it (the key itself is never echoed)."""
    return GatewayError(
        401, message, code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="llm-gateway"'}
    )


def rate_limited(message: str, *, unit: str, retry_after: int) -> GatewayError:
    """429 `rate_limit_exceeded`; `unit` (requests or tokens) is the type, as OpenAI's."""
    return GatewayError(
        429, message, type=unit, code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)}
    )


def insufficient_quota(message: str) -> GatewayError:
    return GatewayError(429, message, type="insufficient_quota", code="insufficient_quota")


def unavailable(message: str, *, code: str, retry_after: int) -> GatewayError:
    return GatewayError(
        503, message, type="service_unavailable", code=code, headers={"Retry-After": str(retry_after)}
    )


def bad_gateway(message: str, *, code: str = "engine_error") -> GatewayError:
    return GatewayError(502, message, type="api_error", code=code)


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


def internal_error(request_id: str) -> GatewayError:
    """What a client learns of an unexpected error: that it happened, and what to quote."""
    return GatewayError(
        500,
        f"The gateway failed to handle this request (request id {request_id}); its log has the details.",
        type="api_error",
        code="internal_error",
        headers={"X-Request-ID": request_id},
    )


class CatchAll:
    """Pure ASGI middleware (inside Starlette's ServerErrorMiddleware, which would answer plain
    text and re-raise): any other exception becomes the OpenAI envelope with a request id that
    is logged with the traceback. If the response has started, a stream of server-sent events
    gets the error as its last event; any other response is cut (the exception goes on to the
    server, which closes the connection)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        progress = _Progress(send)
        try:
            await self.app(scope, receive, progress.send)
        except Exception as exc:
            request_id = secrets.token_hex(8)
            log.error(
                "request %s: %s %s failed", request_id, scope.get("method"), scope.get("path"), exc_info=exc
            )
            error = internal_error(request_id)
            if not progress.started:
                await error.response()(scope, receive, send)
            elif progress.event_stream and not progress.finished:
                await send({"type": "http.response.body", "body": error.sse_event(), "more_body": False})
            elif not progress.finished:
                raise


class _Progress:
    """How far a response got: started, a stream of server-sent events, finished."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = self.event_stream = self.finished = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.event_stream = any(
                k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                for k, v in message.get("headers", ())
            )
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)


def install_error_handlers(app: FastAPI) -> None:
    app.add_middleware(CatchAll)

    @app.exception_handler(GatewayError)
    async def _gateway_error(_request: Request, exc: GatewayError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = (
            f"{param}: {first.get('msg', 'invalid request')}"
            if param
            else first.get("msg", "invalid request")
        )
        return GatewayError(400, message, code="invalid_request", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _STATUS_TYPES.get(
            exc.status_code, "api_error" if exc.status_code >= 500 else "invalid_request_error"
        )
        headers = dict(exc.headers) if exc.headers else None
        return GatewayError(exc.status_code, str(exc.detail), type=kind, headers=headers).response()
