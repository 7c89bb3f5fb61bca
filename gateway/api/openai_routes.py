"""OpenAI-compatible routes. Bodies are read as bytes and forwarded untouched; only `model` and
`stream` are looked at."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from gateway.api.errors import GatewayError, error_doc, model_not_found
from gateway.config.reference import Catalog, ModelSpec
from gateway.config.settings import Settings
from gateway.control.controller import Controller
from gateway.control.fleet import Route
from gateway.proxy.sse import UsageFilter, ask_for_usage, wants_usage
from gateway.proxy.upstream import Call, Proxy

# A Hugging Face token for gated models, per request; handed to the engine it starts, never kept.
HF_TOKEN_HEADER = "x-hf-token"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIGateway:
    """Turns one OpenAI request into a proxied engine call, cold-starting the engine if needed."""

    def __init__(self, *, settings: Settings, catalog: Catalog, controller: Controller, proxy: Proxy) -> None:
        self.settings = settings
        self.catalog = catalog
        self.controller = controller
        self.proxy = proxy

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle(self, request: Request, path: str) -> Response:
        started = time.perf_counter()
        body = await self.read_body(request)
        payload, model, stream = parse_request(body)
        spec = self.catalog.resolve(model)
        if spec is None:
            raise model_not_found(model)
        usage = None
        if stream:
            strip = not wants_usage(payload)
            usage = UsageFilter(strip=strip)
            if strip:  # ask the engine for token usage; the filter removes it again
                body = ask_for_usage(payload)
        route = self.route_of(spec)
        if route is not None:
            call = Call(route=route, path=path, stream=stream, started=started, usage=usage)
            return await self.proxy.forward(call, body, request.headers)
        failure = self.controller.failure(spec.id)
        if failure is not None:
            raise GatewayError(
                400,
                f"The model `{spec.id}` failed to start: {failure.error}",
                code="model_failed",
                param="model",
            )
        token = request.headers.get(HF_TOKEN_HEADER)
        secrets = {"HF_TOKEN": token} if token else None
        if stream:
            return self._cold_stream(spec, path, body, dict(request.headers), secrets, usage, started)
        route = await self.controller.ensure_ready(spec, secrets)
        call = Call(route=route, path=path, stream=False, started=started, hot=False)
        return await self.proxy.forward(call, body, request.headers)

    def route_of(self, spec: ModelSpec) -> Route | None:
        if spec.endpoint is not None:
            return Route(model=spec.id, base_url=spec.endpoint)
        return self.controller.routes.get(spec.id)

    def _cold_stream(
        self,
        spec: ModelSpec,
        path: str,
        body: bytes,
        headers: dict[str, str],
        secrets: dict[str, str] | None,
        usage: UsageFilter | None,
        started: float,
    ) -> Response:
        """A streaming request for a model that is not ready: admit it now (503 if the queue is
        full), answer 200 at once and send `: loading` comment lines until the engine is up, so
        clients and proxies in between do not time out; then relay the engine's stream."""
        task = self.controller.admit(spec, secrets)  # may raise 503 before the 200 is sent

        async def events() -> AsyncIterator[bytes]:
            try:
                t0 = time.monotonic()
                while True:
                    elapsed = time.monotonic() - t0
                    yield f": loading {spec.id} phase={self.controller.phase(spec.id)} elapsed={elapsed:.0f}\n\n".encode()
                    done, _ = await asyncio.wait({task}, timeout=self.settings.loading_comment_seconds)
                    if done:
                        break
                route = task.result()
            except GatewayError as exc:
                yield exc.sse_event()
                return
            call = Call(route=route, path=path, stream=True, started=started, hot=False, usage=usage)
            async for chunk in self.proxy.relay_into_open_stream(call, body, headers):
                yield chunk

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


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
    404: error_doc("Unknown model: `model_not_found`"),
    413: error_doc("Body too large"),
    502: error_doc("The engine failed"),
    503: error_doc("Wait queue full, no capacity, or cold start timed out; has `Retry-After`"),
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
        return await gateway.handle(request, "/v1/chat/completions")

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
        return await gateway.handle(request, "/v1/completions")

    @router.post(
        "/embeddings",
        summary="Embeddings",
        description="OpenAI embeddings, for models of kind `embedding`.",
        openapi_extra=_body_doc("An OpenAI embeddings request.", {"model": "org/embedder", "input": "Hello"}),
        responses=_ERRORS_DOC,
    )
    async def embeddings(request: Request) -> Response:
        return await gateway.handle(request, "/v1/embeddings")

    return router
