"""Errors the gateway itself produces, always in OpenAI's envelope:
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


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


def install_error_handlers(app: FastAPI) -> None:
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
