"""A lean HTTP/1.1 client for the engine connections: asyncio Protocols (uvloop's in the gateway)
with httptools parsing the answers, and a keep-alive pool per origin.

What it does, and nothing more:
- one request at a time per connection; at most `limit` connections in use at once (connecting
  or answering; idle ones do not count, as in aiohttp's TCPConnector), a request waits at most
  `pool_wait` seconds for one; connecting times out after `connect_timeout` seconds;
- an idle connection is reused for at most `keepalive` seconds, and never when the server closed
  it, answered `Connection: close` (or HTTP/1.0), or its answer was not read to its end;
- bodies are passed as they are (no decompression); chunked transfer is decoded; Content-Length,
  chunked and read-until-close answers;
- `read_timeout`: the longest wait between two reads while an answer is expected;
- back-pressure: above HIGH_WATER bytes of body nobody took yet, the socket is not read until
  the consumer has taken them.
Every failure of the engine's side is an `UpstreamError`; its subclass names say what happened
(they appear in the gateway's messages)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 64 * 1024  # body bytes buffered for a consumer before the socket is paused


class UpstreamError(Exception):
    """The engine did not answer, broke off its answer, or was too slow."""


class ConnectionRefused(UpstreamError):
    pass


class ConnectFailed(UpstreamError):
    """No connection for another reason: name resolution, unreachable network, TLS."""


class ConnectTimeout(UpstreamError):
    pass


class PoolTimeout(UpstreamError):
    """Every connection of the pool stayed in use for too long."""


class ServerDisconnected(UpstreamError):
    pass


class ReadTimeout(UpstreamError):
    pass


class InvalidResponse(UpstreamError):
    pass


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int
    host_header: str


def parse_base_url(url: str) -> tuple[Origin, str]:
    """The origin of an `http(s)://host[:port][/prefix]` URL, and its path prefix."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    host_header = parts.netloc.rpartition("@")[2]
    if parts.port == default:
        host_header = host_header.rsplit(":", 1)[0]
    return Origin(parts.scheme, parts.hostname, port, host_header), parts.path.rstrip("/")


def request_head(method: str, origin: Origin, target: str, headers: Mapping[str, str], length: int) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in headers.items()]
    lines.append(f"Content-Length: {length}\r\n\r\n")
    text = "".join(lines)
    if text.count("\n") != len(lines) + 2 or text.count("\r") != len(lines) + 2:
        raise ValueError("a request header holds a line break")
    try:
        return text.encode("latin-1")  # what the server decoded them from (ASGI headers are bytes)
    except UnicodeEncodeError:
        return text.encode()


class Connection(asyncio.Protocol):
    """One connection to an engine; `exchange()` sends a request and returns at its answer's
    headers, `read_chunk()` hands out its body."""

    def __init__(self, client: Client, origin: Origin) -> None:
        self.client = client
        self.origin = origin
        self.loop = client.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.busy = False
        self.idle_since = 0.0
        self.last_io = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # names lowercased
        self.headers_done = False
        self.interim = False  # a 1xx answer, skipped
        self.keep_alive = False
        self.until_close = False
        self.complete = False
        self.error: UpstreamError | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete:
            self._fail(InvalidResponse("the engine sent data outside of an answer"))
            return
        self.last_io = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(InvalidResponse(f"invalid HTTP answer: {exc}"))

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.client.forget(self)
        if self.busy and not self.complete and self.error is None:
            if self.headers_done and self.until_close:
                self.complete = True  # a read-until-close answer ends here
            else:
                self.error = ServerDisconnected(
                    "the engine closed the connection" + (f": {exc}" if exc else "")
                )
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.interim = True
            self.headers = []
            return
        self.status = status
        # Only here: once the message is complete httptools answers False, whatever it said.
        self.keep_alive = self.parser.should_keep_alive()
        framed = any(
            k == b"content-length" or (k == b"transfer-encoding" and b"chunked" in v.lower())
            for k, v in self.headers
        )
        self.until_close = not framed and status not in (204, 304)
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self._wake()

    # the client's side
    async def exchange(self, data: tuple[bytes, bytes]) -> None:
        """Send one request; return when its answer's headers are in."""
        assert self.transport is not None
        self._reset()
        self.busy = True
        self.last_io = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_at(self.last_io + self.client.read_timeout, self._on_timer)
        self.transport.writelines(data)
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read_chunk(self) -> bytes:
        """The body bytes received since the last call; b"" once the answer is complete."""
        while True:
            if self.chunks:
                data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
                self.chunks = []
                self.buffered = 0
                if self.paused and not self.closed and self.transport is not None:
                    self.paused = False
                    self.last_io = self.loop.time()
                    self.transport.resume_reading()
                return data
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            await self._wait()

    @property
    def reusable(self) -> bool:
        return (
            self.complete and self.keep_alive and not self.chunks and self.error is None and not self.closed
        )

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()

    async def _wait(self) -> None:
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()
        self.close()

    def _on_timer(self) -> None:
        """The read timeout, checked lazily: one timer per connection, moved only when it fires."""
        self._timer = None
        if not self.busy or self.complete or self.closed:
            return
        now = self.loop.time()
        if self.paused:  # the consumer is slow, not the engine
            self.last_io = now
        deadline = self.last_io + self.client.read_timeout
        if now >= deadline:
            self._fail(ReadTimeout(f"no data from the engine for {self.client.read_timeout:g} s"))
            return
        self._timer = self.loop.call_at(deadline, self._on_timer)


class Response:
    """An engine's answer: status and headers (names lowercased, as received); the body by
    `read()` or by iterating; `close()` gives the connection back (reused only when the answer
    was read to its end)."""

    __slots__ = ("_client", "_conn", "headers", "status")

    def __init__(self, client: Client, conn: Connection) -> None:
        self.status = conn.status
        self.headers = conn.headers
        self._client = client
        self._conn: Connection | None = conn

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read(self) -> bytes:
        parts = []
        async for chunk in self:
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        if self._conn is None:
            raise StopAsyncIteration
        data = await self._conn.read_chunk()
        if not data:
            raise StopAsyncIteration
        return data

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client.release(conn)


class Client:
    """The pool. Created inside the running event loop."""

    def __init__(
        self,
        read_timeout: float,
        *,
        limit: int = 1000,
        keepalive: float = 4.0,
        pool_wait: float = 30.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.read_timeout = read_timeout
        self.limit = limit
        self.keepalive = keepalive
        self.pool_wait = pool_wait
        self.connect_timeout = connect_timeout
        self.closed = False
        self.in_use = 0  # connections connecting or answering
        self._idle: dict[Origin, list[Connection]] = {}  # most recently used last
        self._all: set[Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._origins: dict[str, tuple[Origin, str]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._tls: ssl.SSLContext | None = None

    async def request(
        self, method: str, base_url: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> Response:
        """Send a request to `base_url + path`; return at its answer's headers."""
        if (parsed := self._origins.get(base_url)) is None:
            parsed = self._origins[base_url] = parse_base_url(base_url)
        origin, prefix = parsed
        head = request_head(method, origin, prefix + path, headers, len(body))
        await self._slot()
        conn: Connection | None = None
        try:
            conn = self._idle_connection(origin) or await self._connect(origin)
            await conn.exchange((head, body))
        except BaseException:
            if conn is not None:
                conn.close()
            self._free_slot()
            raise
        return Response(self, conn)

    def release(self, conn: Connection) -> None:
        conn.busy = False
        if conn.reusable and not self.closed:
            conn.idle_since = self.loop.time()
            self._idle.setdefault(conn.origin, []).append(conn)
            if self._sweep is None:
                self._sweep = self.loop.call_later(self.keepalive, self._sweep_idle)
        else:
            conn.close()
        self._free_slot()

    def forget(self, conn: Connection) -> None:
        self._all.discard(conn)

    @property
    def connections(self) -> int:
        """Open connections, idle or in use."""
        return len(self._all)

    async def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._all):
            conn.close()
        self._idle.clear()

    async def _slot(self) -> None:
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, self.pool_wait)
        except TimeoutError:
            raise PoolTimeout(f"no free connection to the engines within {self.pool_wait:g} s") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._free_slot()  # handed over as this request was cancelled: pass it on
            raise
        finally:
            if not waiter.done() or waiter.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _free_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to the longest waiting request
                return
        self.in_use -= 1

    def _idle_connection(self, origin: Origin) -> Connection | None:
        stack = self._idle.get(origin)
        if not stack:
            return None
        now = self.loop.time()
        while stack:
            conn = stack.pop()
            if conn.closed:
                continue
            if now - conn.idle_since < self.keepalive:
                return conn
            conn.close()  # and the ones below it were idle longer still
            for older in stack:
                older.close()
            stack.clear()
        return None

    async def _connect(self, origin: Origin) -> Connection:
        tls = None
        if origin.scheme == "https":
            tls = self._tls = self._tls or ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: Connection(self, origin), origin.host, origin.port, ssl=tls
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            raise ConnectTimeout(
                f"no connection to {origin.host_header} within {self.connect_timeout:g} s"
            ) from None
        except ConnectionRefusedError as exc:
            raise ConnectionRefused(f"{origin.host_header} refused the connection") from exc
        except OSError as exc:
            raise ConnectFailed(f"no connection to {origin.host_header}: {exc}") from exc
        self._all.add(conn)
        if self.closed:
            conn.close()
            raise ServerDisconnected("the client was closed")
        return conn

    def _sweep_idle(self) -> None:
        """Close the connections idle for `keepalive` seconds (a reused one is checked anyway)."""
        self._sweep = None
        now = self.loop.time()
        for origin, stack in list(self._idle.items()):
            fresh = []
            for conn in stack:
                if not conn.closed and now - conn.idle_since < self.keepalive:
                    fresh.append(conn)
                else:
                    conn.close()
            if fresh:
                self._idle[origin] = fresh
            else:
                del self._idle[origin]
        if self._idle:
            self._sweep = self.loop.call_later(self.keepalive / 2, self._sweep_idle)
