"""Forwarding to engines through one shared httpx client. Bytes pass through untouched, and the
engine's status code and headers reach the client as they are."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping

import httpx
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.activity import Activity
from gateway.clock import Clock
from gateway.deployments import Route
from gateway.errors import GatewayError, bad_gateway, envelope
from gateway.usage import UsageRecord, UsageRecorder

log = logging.getLogger(__name__)

# Headers that belong to one connection, or are recomputed, or are the gateway's own business.
_DROP_REQUEST = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "proxy-authorization",
        "authorization",
        "cookie",
        "x-hf-token",
    }
)
_DROP_RESPONSE = frozenset(
    {"content-length", "connection", "keep-alive", "transfer-encoding", "date", "server"}
)


def request_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _DROP_REQUEST}


def response_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _DROP_RESPONSE}


def new_http_client(read_timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=read_timeout, write=30.0, pool=30.0),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
        follow_redirects=False,
    )


class Proxy:
    def __init__(
        self, client: httpx.AsyncClient, activity: Activity, usage: UsageRecorder, clock: Clock
    ) -> None:
        self.client = client
        self.activity = activity
        self.usage = usage
        self.clock = clock

    async def _send(self, route: Route, path: str, body: bytes, headers: Mapping[str, str]) -> httpx.Response:
        request = self.client.build_request(
            "POST", route.base_url + path, content=body, headers=request_headers(headers)
        )
        try:
            return await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("engine for %s at %s unreachable: %s", route.model, route.base_url, exc)
            raise bad_gateway(f"The engine for {route.model} did not answer: {type(exc).__name__}") from exc

    def _record(
        self, route: Route, path: str, status: int, stream: bool, t0: float, body: bytes | None
    ) -> None:
        now = self.clock()
        self.activity.end(route.model, now)
        self.usage.record(
            UsageRecord(
                at=now,
                model=route.model,
                deployment_id=route.deployment_id,
                path=path,
                status=status,
                stream=stream,
                latency_ms=(time.perf_counter() - t0) * 1000,
                body=body,
            )
        )

    async def forward(
        self, route: Route, path: str, body: bytes, headers: Mapping[str, str], *, stream: bool
    ) -> Response:
        """Proxy one request and return the engine's response: buffered when the client asked for
        no stream, streamed chunk by chunk otherwise."""
        t0 = time.perf_counter()
        self.activity.begin(route.model, self.clock())
        try:
            upstream = await self._send(route, path, body, headers)
        except GatewayError as exc:
            self._record(route, path, exc.status, stream, t0, None)
            raise
        if not stream:
            try:
                content = b"".join([chunk async for chunk in upstream.aiter_raw()])
            except httpx.HTTPError as exc:
                self._record(route, path, 502, stream, t0, None)
                raise bad_gateway(
                    f"The engine for {route.model} broke off its answer: {type(exc).__name__}"
                ) from exc
            finally:
                await upstream.aclose()
            encoded = "content-encoding" in upstream.headers
            self._record(route, path, upstream.status_code, stream, t0, None if encoded else content)
            return Response(
                content, status_code=upstream.status_code, headers=response_headers(upstream.headers)
            )
        return RelayResponse(_Relay(self, route, path, upstream, t0))

    async def relay_into_open_stream(
        self, route: Route, path: str, body: bytes, headers: Mapping[str, str]
    ) -> AsyncIterator[bytes]:
        """For a stream whose 200 and first bytes (loading comments) are already sent: relay the
        engine's events, and turn an engine error status into one SSE error event."""
        t0 = time.perf_counter()
        self.activity.begin(route.model, self.clock())
        try:
            upstream = await self._send(route, path, body, headers)
        except GatewayError as exc:
            self._record(route, path, exc.status, True, t0, None)
            yield exc.sse_event()
            return
        if upstream.status_code >= 400:
            try:
                raw = await upstream.aread()
            finally:
                await upstream.aclose()
            self._record(route, path, upstream.status_code, True, t0, None)
            yield error_event_from_engine(raw, upstream.status_code)
            return
        relay = _Relay(self, route, path, upstream, t0)
        try:
            async for chunk in relay.body():
                yield chunk
        finally:
            await relay.close()


class _Relay:
    """One engine stream being relayed; `close()` runs exactly once whether or not the body was
    ever iterated (a client may disconnect before the first chunk)."""

    def __init__(self, proxy: Proxy, route: Route, path: str, upstream: httpx.Response, t0: float) -> None:
        self.proxy = proxy
        self.route = route
        self.path = path
        self.upstream = upstream
        self.t0 = t0
        self.status = upstream.status_code
        self._closed = False

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            self.status = 502
            log.warning("engine for %s broke off a stream: %s", self.route.model, exc)
            yield stream_error(
                f"The engine for {self.route.model} broke off the stream.", code="engine_error"
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.upstream.aclose()
        finally:
            self.proxy._record(self.route, self.path, self.status, True, self.t0, None)


class RelayResponse(StreamingResponse):
    def __init__(self, relay: _Relay) -> None:
        super().__init__(
            relay.body(), status_code=relay.status, headers=response_headers(relay.upstream.headers)
        )
        self.relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.relay.close()


def stream_error(message: str, *, code: str, type: str = "api_error") -> bytes:
    return b"data: " + json.dumps(envelope(message, type=type, code=code)).encode() + b"\n\n"


def error_event_from_engine(raw: bytes, status: int) -> bytes:
    """An engine's error body as an SSE event, kept as is when it already is an OpenAI envelope."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return b"data: " + json.dumps(parsed).encode() + b"\n\n"
    message = raw.decode(errors="replace")[:2000] or f"engine answered {status}"
    return stream_error(
        message, code=str(status), type="invalid_request_error" if status < 500 else "api_error"
    )
