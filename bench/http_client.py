"""A minimal HTTP/1.1 keep-alive client (asyncio protocol + httptools) used as the load generator.

httpx costs several hundred microseconds per request in Python, as much as what is measured;
this client sends pre-encoded request bytes and only parses the status, the body length and
SSE event boundaries, so on uvloop it costs tens of microseconds per request.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools


def post_request(url: str, path: str, payload: dict[str, Any], *, bearer: str | None = None) -> bytes:
    """The bytes of one `POST path` with a JSON body, keep-alive (with `bearer`, its Authorization)."""
    host = urlsplit(url).netloc
    body = json.dumps(payload).encode()
    auth = f"authorization: Bearer {bearer}\r\n" if bearer else ""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"accept: */*\r\n{auth}content-length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


@dataclass
class Reply:
    status: int
    started: float  # perf_counter when the request was written
    first_event: float  # when the first complete SSE event (or, unstreamed, the first body byte) arrived
    ended: float  # when the response was complete
    events: int  # complete SSE events ("...\n\n") in the body
    body_bytes: int

    @property
    def latency(self) -> float:
        return self.ended - self.started

    @property
    def time_to_first_event(self) -> float:
        return self.first_event - self.started


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Reply] | None = None
        self.lost = False
        self.keep_alive = True
        self.begin(0.0, stream=False)

    def begin(self, started: float, *, stream: bool) -> None:
        self.started = started
        self.stream = stream
        self.first_event = 0.0
        self.events = 0
        self.body_bytes = 0
        self.last_byte = b""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(ConnectionError(f"invalid HTTP response: {exc}"))
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        # Only here: once the message is complete, httptools answers False whatever the headers
        # said (read there, every request of this client opened a new connection).
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        now = time.perf_counter()
        self.events += (self.last_byte + body).count(b"\n\n")
        self.last_byte = body[-1:]
        self.body_bytes += len(body)
        if not self.first_event and (self.events or not self.stream):
            self.first_event = now

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(
                Reply(
                    status=self.parser.get_status_code(),
                    started=self.started,
                    first_event=self.first_event or now,
                    ended=now,
                    events=self.events,
                    body_bytes=self.body_bytes,
                )
            )


class Client:
    """One keep-alive connection, one request at a time; reconnects when the server closes."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.conn: _Connection | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        self.conn = conn

    async def send(self, request: bytes, *, stream: bool = False, timeout: float = 60.0) -> Reply:
        """Send one request and wait for the whole answer. With `stream`, `first_event` is when the
        first complete SSE event arrived; otherwise when the first body byte did."""
        if self.conn is None or self.conn.lost:
            await self.connect()
        conn = self.conn
        assert conn is not None and conn.transport is not None
        conn.waiter = asyncio.get_running_loop().create_future()
        conn.begin(time.perf_counter(), stream=stream)
        conn.transport.write(request)
        reply = await asyncio.wait_for(conn.waiter, timeout)
        if not conn.keep_alive:
            self.close()
        return reply

    def close(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.close()
        self.conn = None
