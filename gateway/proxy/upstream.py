"""Forwarding to engines through one pool of keep-alive connections (http1.py). Bytes pass
through untouched (no decompression), and the engine's status code and headers reach the client
as they are (the one exception: a usage event the gateway asked for on the client's behalf is
removed again, see sse.py).

One proxied request is one `Proxy.exchange()`: it counts the request in flight, sends it, relays
the answer to the client and accounts for it, inside one `try/finally` — so an error, a client
that goes away, or a cancellation can never leave a request counted.

Our own HTTP/1.1 client (http1.py: asyncio protocols, httptools parsing) rather than aiohttp:
the gateway only ever sends a POST to a few engines and relays the answer, and aiohttp's general
machinery was about 40% of the gateway's GIL time at 32 connections (a profile). Measured
in one run on our 2-core machine, same process and stub, 32 concurrent requests: aiohttp spent
167-192 us of CPU per request, http1 34-47 us (and made 7,600-8,100 requests/s to aiohttp's
2,100-2,500); the whole gateway's CPU per request fell from 735-973 us to 479-709 us (c=1,
alternating runs), and its c=32 rate in `python -m bench --quick` from 1,000 to 2,116
requests/s. Before that, aiohttp replaced httpx, whose pool made 142 requests/s at 32
concurrent requests where aiohttp made 4,089."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from gateway.accounting.metrics import Metrics
from gateway.accounting.usage import UsageRecord, UsageRecorder, body_tokens, tokens_of
from gateway.api.errors import GatewayError, bad_gateway, envelope
from gateway.auth.keyring import KeyRing
from gateway.clock import Clock
from gateway.control.activity import Activity
from gateway.control.fleet import Route
from gateway.proxy.http1 import Client, UpstreamError
from gateway.proxy.http1 import Response as Upstream
from gateway.proxy.sse import UsageFilter

log = logging.getLogger(__name__)

# Headers that belong to one connection, or are recomputed, or are the gateway's own business
# (the client's Authorization is its gateway API key: the engine gets its own key instead).
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
    {b"content-length", b"connection", b"keep-alive", b"transfer-encoding", b"date", b"server"}
)
# Below vLLM's (uvicorn's) own keep-alive of 5 s, so a reused connection is never one the engine
# is closing at that moment.
KEEPALIVE_SECONDS = 4.0
# How long a request waits for a free connection of the pool before it is a 502.
POOL_WAIT_SECONDS = 30.0


def request_headers(headers: Mapping[str, str], api_key: str | None = None) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower() not in _DROP_REQUEST}
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The engine's headers (names lowercased, as http1.Response has them) that reach the client."""
    return [(k, v) for k, v in headers if k not in _DROP_RESPONSE]


# Errors of an engine that did not answer or broke off (http1's subclasses name what happened).
UPSTREAM_ERRORS = (UpstreamError,)


def new_http_client(read_timeout: float) -> Client:
    """Created inside the running event loop (on first use)."""
    return Client(
        read_timeout,
        limit=1000,
        keepalive=KEEPALIVE_SECONDS,
        pool_wait=POOL_WAIT_SECONDS,
        connect_timeout=5.0,
    )


@dataclass
class Call:
    """One proxied request: what it is, and its clock readings (perf_counter seconds)."""

    route: Route
    path: str
    stream: bool
    started: float  # when the gateway received it
    hot: bool = True  # routed to a ready engine at once (its overhead is measured)
    usage: UsageFilter | None = None  # streams: reads (and maybe strips) the engine's usage event
    upstream_started: float = 0.0
    upstream_seconds: float | None = None  # time the engine took to answer a buffered request
    status: int = 0
    body: bytes | None = None  # a buffered answer, for its token counts
    key_id: str | None = None  # the client's API key (client_auth: keys)


class Proxy:
    def __init__(
        self,
        read_timeout: float,
        activity: Activity,
        usage: UsageRecorder,
        clock: Clock,
        metrics: Metrics,
        on_engine_error: Callable[[Route, str], None] = lambda route, reason: None,
        keys: KeyRing | None = None,
    ) -> None:
        self.read_timeout = read_timeout
        self._client: Client | None = None
        self.activity = activity
        self.usage = usage
        self.clock = clock
        self.metrics = metrics
        # Told when an engine did not answer or broke off: the controller checks whether it died.
        self.on_engine_error = on_engine_error
        self.keys = keys  # told the tokens of keys with a tokens-per-minute limit

    @property
    def client(self) -> Client:
        if self._client is None or self._client.closed:
            self._client = new_http_client(self.read_timeout)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def exchange(
        self,
        call: Call,
        body: bytes,
        headers: Mapping[str, str],
        send: Send,
        receive: Receive,
        *,
        open_stream: bool = False,
    ) -> None:
        """The whole proxied request. With `open_stream`, the client's 200 and first bytes were
        sent already (a cold stream): errors become one SSE error event."""
        route = call.route
        try:
            with self.activity.track(route.model, route.deployment_id, self.clock):
                await self._relay(call, body, headers, send, receive, open_stream)
        finally:
            self._account(call)

    async def _relay(
        self,
        call: Call,
        body: bytes,
        headers: Mapping[str, str],
        send: Send,
        receive: Receive,
        open_stream: bool,
    ) -> None:
        try:
            upstream = await self._send(call, body, headers)
        except GatewayError as exc:
            call.status = exc.status
            await (_send_event(send, exc.sse_event()) if open_stream else _send_error(send, exc))
            return
        try:
            call.status = upstream.status
            if open_stream:
                await self._into_open_stream(call, upstream, send, receive)
            elif call.stream and upstream.status < 400:
                await self._stream(call, upstream, send, receive)
            else:
                await self._buffered(call, upstream, send)
        finally:
            upstream.close()

    async def _send(self, call: Call, body: bytes, headers: Mapping[str, str]) -> Upstream:
        route = call.route
        call.upstream_started = time.perf_counter()
        try:
            return await self.client.request(
                "POST", route.base_url, call.path, request_headers(headers, route.api_key), body
            )
        except UPSTREAM_ERRORS as exc:
            log.warning("engine for %s at %s unreachable: %s", route.model, route.base_url, exc)
            self.on_engine_error(route, f"unreachable: {type(exc).__name__}")
            raise bad_gateway(f"The engine for {route.model} did not answer: {type(exc).__name__}") from exc

    async def _buffered(self, call: Call, upstream: Upstream, send: Send) -> None:
        try:
            content = await upstream.read()
        except UPSTREAM_ERRORS as exc:
            call.status = 502
            self.on_engine_error(call.route, f"broke off an answer: {type(exc).__name__}")
            await _send_error(
                send,
                bad_gateway(f"The engine for {call.route.model} broke off its answer: {type(exc).__name__}"),
            )
            return
        call.upstream_seconds = time.perf_counter() - call.upstream_started
        if upstream.header(b"content-encoding") is None:
            call.body = content
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status,
                "headers": response_headers(upstream.headers),
            }
        )
        await send({"type": "http.response.body", "body": content})

    async def _stream(self, call: Call, upstream: Upstream, send: Send, receive: Receive) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status,
                "headers": response_headers(upstream.headers),
            }
        )
        await _until_disconnect(self._pump(call, upstream, send), receive)
        await send({"type": "http.response.body", "body": b""})

    async def _into_open_stream(self, call: Call, upstream: Upstream, send: Send, receive: Receive) -> None:
        if upstream.status >= 400:
            try:
                raw = await upstream.read()
            except UPSTREAM_ERRORS:
                raw = b""
            await _send_event(send, error_event_from_engine(raw, upstream.status))
            return
        await _until_disconnect(self._pump(call, upstream, send), receive)

    async def _pump(self, call: Call, upstream: Upstream, send: Send) -> None:
        usage = call.usage
        try:
            async for chunk in upstream:
                out = usage.feed(chunk) if usage is not None else chunk
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            if usage is not None and (rest := usage.close()):
                await send({"type": "http.response.body", "body": rest, "more_body": True})
        except UPSTREAM_ERRORS as exc:
            call.status = 502
            log.warning("engine for %s broke off a stream: %s", call.route.model, exc)
            self.on_engine_error(call.route, f"broke off a stream: {type(exc).__name__}")
            event = stream_error(
                f"The engine for {call.route.model} broke off the stream.", code="engine_error"
            )
            await send({"type": "http.response.body", "body": event, "more_body": True})

    def _account(self, call: Call) -> None:
        """Metrics and a usage row (written later) for a finished request."""
        now = time.perf_counter()
        model = call.route.model
        self.metrics.requests.labels(model=model, path=call.path, status=str(call.status)).inc()
        self.metrics.latency.labels(model=model).observe(now - call.started)
        if call.hot and call.upstream_started:
            waited = call.upstream_seconds if call.upstream_seconds is not None else 0.0
            own = (call.upstream_started - call.started) + (
                (now - call.upstream_started - waited) if call.upstream_seconds is not None else 0.0
            )
            self.metrics.overhead.labels(model=model).observe(max(own, 0.0))
        self.usage.record(
            UsageRecord(
                at=self.clock(),
                model=model,
                deployment_id=call.route.deployment_id,
                path=call.path,
                status=call.status,
                stream=call.stream,
                latency_ms=(now - call.started) * 1000,
                body=call.body,
                usage=call.usage.usage if call.usage is not None else None,
                api_key_id=call.key_id,
            )
        )
        if call.key_id is not None and self.keys is not None and self.keys.wants_tokens(call.key_id):
            self.keys.used_tokens(call.key_id, _tokens_of(call))


def _tokens_of(call: Call) -> int:
    """A finished request's tokens, read now (only for keys with a tokens-per-minute limit;
    the usage recorder reads the others' later, off the loop)."""
    if call.usage is not None:
        prompt, completion = tokens_of(call.usage.usage)
    elif call.body is not None:
        prompt, completion = body_tokens(call.body)
    else:
        return 0
    return (prompt or 0) + (completion or 0)


async def _until_disconnect(pump: Coroutine[Any, Any, None], receive: Receive) -> None:
    """Run `pump` until it ends or the client disconnects; a client that goes away cuts the
    engine's stream short (its connection is closed, so the engine stops generating)."""
    await first_of(pump, _disconnected(receive))


async def first_of(*coros: Coroutine[Any, Any, None]) -> None:
    """Run the coroutines until the first one ends; the others are cancelled. An error of the
    first is raised; one raised while the others were being cancelled is not."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error


async def _disconnected(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _send_error(send: Send, exc: GatewayError) -> None:
    body = json.dumps(exc.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_event(send: Send, event: bytes) -> None:
    await send({"type": "http.response.body", "body": event, "more_body": True})


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


class ProxiedResponse(Response):
    """A response that is one whole `Proxy.exchange()` (FastAPI routes return it)."""

    def __init__(self, proxy: Proxy, call: Call, body: bytes, headers: Mapping[str, str]) -> None:
        # Response.__init__ is not called: nothing is rendered here, the engine's answer is
        # relayed when the server calls the response.
        self.proxy = proxy
        self.call = call
        self.request_body = body
        self.request_headers = headers
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.proxy.exchange(self.call, self.request_body, self.request_headers, send, receive)
