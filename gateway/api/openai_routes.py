"""OpenAI-compatible routes. Bodies are read as bytes and forwarded untouched; only `model` and
`stream` are looked at."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import APIRouter, Request
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.errors import CatchAll, GatewayError, error_doc, model_not_found, unavailable
from gateway.auth.keyring import KeyRing
from gateway.auth.keys import ClientKey
from gateway.config.reference import Catalog, ModelSpec
from gateway.config.settings import Settings
from gateway.control.controller import Controller
from gateway.control.fleet import Failure, Route
from gateway.fleet.follower import Follower
from gateway.proxy.sse import UsageFilter, ask_for_usage, should_ask_for_usage
from gateway.proxy.upstream import Call, ProxiedResponse, Proxy

# A Hugging Face token for gated models, per request; handed to the engine it starts, never kept.
HF_TOKEN_HEADER = "x-hf-token"
# Retry-After of a key that may not wake a cold model: an admin may load it meanwhile.
RETRY_AFTER_NOT_RUNNING = 30
# What the gateway answers a client that went away before its answer (nginx's convention).
CLIENT_CLOSED_REQUEST = 499
SSE_RAW_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ColdWaiter(Protocol):
    """One request waiting for its model's start (on the lease holder, or on a follower)."""

    @property
    def model(self) -> str: ...

    @property
    def phase(self) -> str: ...

    async def wait(self) -> Route: ...


class Placement(Protocol):
    """Who starts models for this gateway's requests: its controller (the lease holder) or its
    follower (which asks the holder)."""

    def failure(self, model: str) -> Failure | None: ...

    def starting(self, model: str) -> bool: ...

    def admit(
        self, spec: ModelSpec, secrets: Mapping[str, str] | None = None, *, started_by: str | None = None
    ) -> ColdWaiter: ...


class OpenAIGateway:
    """Turns one OpenAI request into a proxied engine call, cold-starting the engine if needed."""

    def __init__(
        self,
        *,
        settings: Settings,
        catalog: Catalog,
        controller: Controller,
        proxy: Proxy,
        keys: KeyRing,
        follower: Follower | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.controller = controller
        self.proxy = proxy
        self.keys = keys
        self.follower = follower  # routes while this process does not hold the lease

    @property
    def placement(self) -> Placement:
        follower = self.follower
        return follower if follower is not None and follower.active else self.controller

    async def respond(self, path: str, headers: Headers, receive: Receive) -> Response:
        """The response to one OpenAI request (the body is read from `receive`): relayed from a
        ready engine, or after waiting for a cold start. Used by the lean front below FastAPI
        and by the FastAPI routes alike."""
        started = time.perf_counter()
        key = self.keys.authenticate(headers.get("authorization"))  # before the body is read
        try:
            body = await read_body(receive, headers, self.settings.max_body_bytes)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        payload, model, stream = parse_request(body)
        spec = self.catalog.resolve(model)
        if spec is None:
            raise model_not_found(model)
        if key is not None:
            self.keys.admit(key, spec.id)
        key_id = key.id if key is not None else None
        usage = None
        if stream:
            strip = should_ask_for_usage(spec, payload)
            usage = UsageFilter(strip=strip)
            if strip:  # ask the engine for token usage; the filter removes it again
                body = ask_for_usage(payload)
        route = self.route_of(spec)
        if route is not None:
            call = Call(route=route, path=path, stream=stream, started=started, usage=usage, key_id=key_id)
            return ProxiedResponse(self.proxy, call, body, headers)
        return await self._cold(spec, key, path, body, headers, receive, usage, started)

    async def _cold(
        self,
        spec: ModelSpec,
        key: ClientKey | None,
        path: str,
        body: bytes,
        headers: Headers,
        receive: Receive,
        usage: UsageFilter | None,
        started: float,
    ) -> Response:
        placement = self.placement
        failure = placement.failure(spec.id)
        if failure is not None:
            raise GatewayError(
                400,
                f"The model `{spec.id}` failed to start recently (deployment {failure.deployment_id}); "
                "an admin can see why in /admin/failures and reset it.",
                code="model_failed",
                param="model",
            )
        token = headers.get(HF_TOKEN_HEADER)
        secrets = {"HF_TOKEN": token} if token else None
        if key is not None and not key.may_wake and not placement.starting(spec.id):
            raise unavailable(
                f"The model `{spec.id}` is not running, and the API key {key.id} may not start models; "
                "retry once an admin has loaded it.",
                code="model_not_running",
                retry_after=RETRY_AFTER_NOT_RUNNING,
            )
        key_id = key.id if key is not None else None
        # may raise 503 before anything is sent; a start it causes is the key's
        waiter = placement.admit(spec, secrets, started_by=key_id)
        cold = ColdStart(self, waiter, path, body, dict(headers), usage, started, key_id)
        if usage is not None:  # a stream
            return ColdStreamResponse(cold)
        try:
            route = await cold.wait_unless_gone(receive)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; logs and metrics do
        call = Call(route=route, path=path, stream=False, started=started, hot=False, key_id=key_id)
        return ProxiedResponse(self.proxy, call, body, headers)

    def route_of(self, spec: ModelSpec) -> Route | None:
        if spec.endpoint is not None:
            return Route(model=spec.id, base_url=spec.endpoint)
        follower = self.follower
        if follower is not None and follower.active:
            return follower.route(spec.id)
        return self.controller.route(spec.id)


@dataclass
class ColdStart:
    """A request admitted to wait for its model's start."""

    gateway: OpenAIGateway
    waiter: ColdWaiter
    path: str
    body: bytes
    headers: dict[str, str]
    usage: UsageFilter | None
    started: float
    key_id: str | None = None

    async def wait_unless_gone(self, receive: Receive) -> Route:
        """The route once the model is ready; a client that disconnects first leaves the queue
        (its request is never sent to the engine)."""
        waiting = asyncio.ensure_future(self.waiter.wait())
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not waiting.done():
                waiting.cancel()
            await asyncio.gather(waiting, gone, return_exceptions=True)
        if waiting.cancelled():
            raise ClientGone()
        return waiting.result()


class ClientGone(Exception):
    """The client disconnected while its request waited: nothing is left to answer."""


class ColdStreamResponse(Response):
    """A streaming request for a model that is not ready: 200 at once and `: loading` comment
    lines until the engine is up, so clients and proxies in between do not time out; then the
    engine's stream (or one error event)."""

    def __init__(self, cold: ColdStart) -> None:
        self.cold = cold  # Response.__init__ not called: nothing to render ahead
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cold = self.cold
        await send({"type": "http.response.start", "status": 200, "headers": SSE_RAW_HEADERS})
        try:
            route = await self._loading(send, receive)
        except GatewayError as exc:
            await send({"type": "http.response.body", "body": exc.sse_event(), "more_body": True})
        except ClientGone:
            return
        else:
            call = Call(
                route=route,
                path=cold.path,
                stream=True,
                started=cold.started,
                hot=False,
                usage=cold.usage,
                key_id=cold.key_id,
            )
            await cold.gateway.proxy.exchange(call, cold.body, cold.headers, send, receive, open_stream=True)
        await send({"type": "http.response.body", "body": b""})

    async def _loading(self, send: Send, receive: Receive) -> Route:
        cold = self.cold
        period = cold.gateway.settings.loading_comment_seconds
        t0 = time.monotonic()
        task = asyncio.ensure_future(cold.wait_unless_gone(receive))
        try:
            while True:
                comment = f": loading {cold.waiter.model} phase={cold.waiter.phase} elapsed={time.monotonic() - t0:.0f}\n\n"
                await send({"type": "http.response.body", "body": comment.encode(), "more_body": True})
                done, _ = await asyncio.wait({task}, timeout=period)
                if done:
                    return task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def read_body(receive: Receive, headers: Headers, limit: int) -> bytes:
    """The request body, at most `limit` bytes (413 past it)."""
    declared = headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class OpenAIFront:
    """ASGI app in front of the FastAPI application (`GatewayApp`): the three OpenAI POST
    routes answered right here, below FastAPI's routing, dependency, middleware and exception
    layers (the hot path's largest cost in a profile); everything else goes on to FastAPI.
    An unexpected error is answered as `CatchAll` answers it. The FastAPI routes of the same
    paths stay, so the OpenAPI document lists them, and give the same answers."""

    def __init__(self, app: ASGIApp, gateway: OpenAIGateway) -> None:
        self.app = app
        self.gateway = gateway
        self._guarded = CatchAll(self._serve)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in OPENAI_PATHS:
            await self._guarded(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self.gateway.respond(scope["path"], Headers(scope=scope), receive)
        except GatewayError as exc:
            response = exc.response()
        await response(scope, receive, send)


OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")


def parse_request(body: bytes) -> tuple[dict[str, Any], str, bool]:
    """The JSON body, its `model` and whether it asks for a stream (400 on anything else)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_request")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(
            400, "`model` is required and must be a string.", code="invalid_request", param="model"
        )
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise GatewayError(400, "`stream` must be a boolean.", code="invalid_request", param="stream")
    return payload, model, stream


def _body_doc(description: str, example: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["model"],
                        "properties": {
                            "model": {"type": "string", "minLength": 1},
                            "stream": {"type": "boolean"},
                        },
                        "additionalProperties": True,
                    },
                    "example": example,
                }
            },
        }
    }


_ERRORS_DOC: dict[int | str, dict[str, Any]] = {
    400: error_doc("Invalid JSON or fields, or the model failed to start recently (`model_failed`)"),
    401: error_doc("Missing, wrong, revoked or expired API key: `invalid_api_key`"),
    404: error_doc("Unknown model, or one the API key may not use: `model_not_found`"),
    413: error_doc("Body too large"),
    429: error_doc(
        "The key's requests or tokens per minute (`rate_limit_exceeded`, has `Retry-After`), "
        "or its monthly budget (`insufficient_quota`)"
    ),
    502: error_doc("The engine failed"),
    503: error_doc(
        "Wait queue full, no capacity, cold start timed out, or the model is not running and the "
        "key may not start it (`model_not_running`); has `Retry-After`"
    ),
}


def openai_router(gateway: OpenAIGateway) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI"])

    @router.post(
        "/chat/completions",
        summary="Chat completion",
        description="OpenAI chat completions, proxied to the engine serving `model`; the engine is "
        "started if none serves it. With `stream: true`, a cold start sends `: loading` SSE comments.",
        openapi_extra=_body_doc(
            "An OpenAI chat completion request; passed to the engine as is.",
            {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16},
        ),
        responses=_ERRORS_DOC,
    )
    async def chat_completions(request: Request) -> Response:
        return await gateway.respond("/v1/chat/completions", request.headers, request.receive)

    @router.post(
        "/completions",
        summary="Text completion",
        description="OpenAI (legacy) completions, proxied like chat completions.",
        openapi_extra=_body_doc(
            "An OpenAI completion request.",
            {"model": "tiny-llama", "prompt": "Once upon a time", "max_tokens": 16},
        ),
        responses=_ERRORS_DOC,
    )
    async def completions(request: Request) -> Response:
        return await gateway.respond("/v1/completions", request.headers, request.receive)

    @router.post(
        "/embeddings",
        summary="Embeddings",
        description="OpenAI embeddings, for models of kind `embedding`.",
        openapi_extra=_body_doc("An OpenAI embeddings request.", {"model": "org/embedder", "input": "Hello"}),
        responses=_ERRORS_DOC,
    )
    async def embeddings(request: Request) -> Response:
        return await gateway.respond("/v1/embeddings", request.headers, request.receive)

    return router
