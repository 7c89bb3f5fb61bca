"""The engine client (gateway/proxy/http1.py) against real servers on 127.0.0.1: small asyncio
servers whose answers each test writes byte by byte."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway.proxy import http1
from tests.stub_upstream import free_port

Answer = Callable[[asyncio.StreamWriter, "Seen"], Awaitable[None]]


@dataclass
class Seen:
    """What the server received."""

    connections: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)  # (head, body)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body),
        extra,
        body,
    )


@contextlib.asynccontextmanager
async def server(answer: Answer) -> AsyncIterator[tuple[str, Seen]]:
    """Reads requests (Content-Length bodies) one after the other and lets `answer` reply."""
    seen = Seen()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                seen.requests.append((head, await reader.readexactly(length)))
                await answer(writer, seen)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went, or the test ended
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        srv.close()


async def keep_alive(writer: asyncio.StreamWriter, seen: Seen) -> None:
    writer.write(ok(b'{"n": %d}' % len(seen.requests)))


async def post(client: http1.Client, url: str, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await client.request(
        "POST", url, "/v1/chat/completions", {"Content-Type": "application/json"}, body
    )
    try:
        return response.status, await response.read()
    finally:
        response.close()


async def test_one_connection_serves_many_requests() -> None:
    async with server(keep_alive) as (url, seen):
        client = http1.Client(5.0)
        for n in range(1, 21):
            assert await post(client, url, b'{"a": 1}') == (200, b'{"n": %d}' % n)
        assert seen.connections == 1 and client.connections == 1
        head, body = seen.requests[0]
        assert body == b'{"a": 1}'
        lines = head.lower().split(b"\r\n")
        assert lines[0] == b"post /v1/chat/completions http/1.1"
        assert f"host: {url.removeprefix('http://')}".encode() in lines
        assert b"content-length: 8" in lines and b"content-type: application/json" in lines
        assert not any(line.startswith(b"user-agent") for line in lines)
        await client.close()
        assert client.connections == 0 or all(c.closed for c in client._all)


async def test_a_path_prefix_of_the_base_url_is_kept() -> None:
    async with server(keep_alive) as (url, seen):
        client = http1.Client(5.0)
        assert (await post(client, url + "/openai"))[0] == 200
        assert seen.requests[0][0].startswith(b"POST /openai/v1/chat/completions HTTP/1.1\r\n")
        await client.close()


async def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    async def answer_then_close_soon(writer: asyncio.StreamWriter, seen: Seen) -> None:
        writer.write(ok(b"{}"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # like uvicorn's keep-alive timeout: no Connection: close was said

    async with server(answer_then_close_soon) as (url, seen):
        client = http1.Client(5.0)
        assert await post(client, url) == (200, b"{}")
        await asyncio.sleep(0.3)
        assert await post(client, url) == (200, b"{}")  # on a new connection
        assert seen.connections == 2
        await client.close()


async def test_a_server_that_closes_mid_request_is_server_disconnected() -> None:
    async def hang_up(writer: asyncio.StreamWriter, seen: Seen) -> None:
        writer.close()

    async with server(hang_up) as (url, _):
        client = http1.Client(5.0)
        with pytest.raises(http1.ServerDisconnected):
            await post(client, url)
        assert client.in_use == 0
        await client.close()


async def test_a_stream_broken_off_raises_after_its_data() -> None:
    async def half(writer: asyncio.StreamWriter, seen: Seen) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async with server(half) as (url, _):
        client = http1.Client(5.0)
        response = await client.request("POST", url, "/", {}, b"")
        assert await response.__anext__() == b"hello"
        with pytest.raises(http1.ServerDisconnected):
            await response.__anext__()
        response.close()
        assert client.in_use == 0
        await client.close()


async def test_connection_close_is_honoured() -> None:
    async def say_close(writer: asyncio.StreamWriter, seen: Seen) -> None:
        writer.write(ok(b"{}", b"connection: close\r\n"))  # and keeps the socket open

    async with server(say_close) as (url, seen):
        client = http1.Client(5.0)
        for _ in range(3):
            assert await post(client, url) == (200, b"{}")
        assert seen.connections == 3
        await client.close()


async def test_chunked_bodies_are_decoded_and_headers_kept() -> None:
    async def chunked(writer: asyncio.StreamWriter, seen: Seen) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n"
        )
        for piece in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")

    async with server(chunked) as (url, seen):
        client = http1.Client(5.0)
        response = await client.request("POST", url, "/", {}, b"")
        assert response.status == 200
        assert response.headers == [
            (b"content-type", b"text/event-stream"),
            (b"transfer-encoding", b"chunked"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
        ]
        pieces = [chunk async for chunk in response]
        assert b"".join(pieces) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n" and len(pieces) >= 2
        response.close()
        again = await post(client, url)  # the same connection: the stream was read to its end
        assert again == (200, b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n")
        assert seen.connections == 1
        await client.close()


async def test_gzip_bodies_pass_undecoded() -> None:
    import gzip

    packed = gzip.compress(b'{"x": 1}')

    async def gzipped(writer: asyncio.StreamWriter, seen: Seen) -> None:
        writer.write(ok(packed, b"content-encoding: gzip\r\n"))

    async with server(gzipped) as (url, _):
        client = http1.Client(5.0)
        response = await client.request("POST", url, "/", {}, b"")
        assert response.header(b"content-encoding") == b"gzip" and await response.read() == packed
        response.close()
        await client.close()


async def test_a_read_until_close_answer_ends_at_the_close() -> None:
    async def until_close(writer: asyncio.StreamWriter, seen: Seen) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")
        await writer.drain()
        writer.close()

    async with server(until_close) as (url, seen):
        client = http1.Client(5.0)
        assert await post(client, url) == (200, b"part one, part two")
        assert await post(client, url) == (200, b"part one, part two")
        assert seen.connections == 2
        await client.close()


async def test_read_timeout_before_and_between_reads() -> None:
    async def stall_at_once(writer: asyncio.StreamWriter, seen: Seen) -> None:
        if len(seen.requests) == 2:  # the second answer stalls in its body
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
        await asyncio.sleep(5)

    async with server(stall_at_once) as (url, _):
        client = http1.Client(0.3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(http1.ReadTimeout):
            await post(client, url)  # no status line
        assert 0.25 < loop.time() - t0 < 1.5
        response = await client.request("POST", url, "/", {}, b"")
        with pytest.raises(http1.ReadTimeout):
            await response.read()
        response.close()
        assert client.in_use == 0
        await client.close()


async def test_a_slow_engine_within_the_read_timeout_is_fine() -> None:
    async def trickle(writer: asyncio.StreamWriter, seen: Seen) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        for byte in b"abcde":
            await asyncio.sleep(0.15)  # each read within 0.3 s, the whole answer in 0.75 s
            writer.write(bytes([byte]))
            await writer.drain()

    async with server(trickle) as (url, _):
        client = http1.Client(0.3)
        assert await post(client, url) == (200, b"abcde")
        await client.close()


async def test_connection_refused() -> None:
    client = http1.Client(5.0)
    with pytest.raises(http1.ConnectionRefused):
        await post(client, f"http://127.0.0.1:{free_port()}")
    assert client.in_use == 0
    await client.close()


async def test_pool_limit_and_wait_timeout() -> None:
    release = asyncio.Event()

    async def slow(writer: asyncio.StreamWriter, seen: Seen) -> None:
        await release.wait()
        writer.write(ok(b"{}"))

    async with server(slow) as (url, seen):
        client = http1.Client(5.0, limit=2, pool_wait=0.3)
        first = [asyncio.ensure_future(post(client, url)) for _ in range(2)]
        await asyncio.sleep(0.1)
        assert client.in_use == 2
        with pytest.raises(http1.PoolTimeout):
            await post(client, url)  # no third connection
        waiting = asyncio.ensure_future(post(client, url))
        await asyncio.sleep(0.1)
        release.set()  # a connection comes back within the wait: the waiter gets it
        assert await asyncio.gather(*first, waiting) == [(200, b"{}")] * 3
        assert seen.connections == 2 and client.in_use == 0
        await client.close()


async def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    release = asyncio.Event()

    async def slow(writer: asyncio.StreamWriter, seen: Seen) -> None:
        await release.wait()
        writer.write(ok(b"{}"))

    async with server(slow) as (url, _):
        client = http1.Client(5.0, limit=1, pool_wait=5.0)
        first = asyncio.ensure_future(post(client, url))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(post(client, url))
        last = asyncio.ensure_future(post(client, url))
        await asyncio.sleep(0.05)
        gone.cancel()
        release.set()
        assert await first == (200, b"{}") and await last == (200, b"{}")
        assert client.in_use == 0
        await client.close()


async def test_back_pressure_stops_reading_a_stream_nobody_reads() -> None:
    piece = b"x" * 16384
    total = 20 * 1024 * 1024
    sent = []

    async def flood(writer: asyncio.StreamWriter, seen: Seen) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        for _ in range(total // len(piece)):
            writer.write(piece)
            await writer.drain()
            sent.append(len(piece))

    async with server(flood) as (url, _):
        client = http1.Client(5.0)
        response = await client.request("POST", url, "/", {}, b"")
        await asyncio.sleep(0.5)  # the consumer takes nothing
        [conn] = client._all
        # The mark, plus what one read of the socket brought in before the pause took effect.
        assert conn.buffered <= http1.HIGH_WATER + 512 * 1024
        assert sum(sent) < total // 2  # the server is held back by TCP, not buffered by us
        received = 0
        async for chunk in response:
            received += len(chunk)
            assert conn.buffered <= http1.HIGH_WATER + 512 * 1024
        assert received == total
        response.close()
        await client.close()


async def test_a_stream_closed_before_its_end_is_not_reused() -> None:
    async def stream(writer: asyncio.StreamWriter, seen: Seen) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(5):
            writer.write(b"5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")

    async with server(stream) as (url, seen):
        client = http1.Client(5.0)
        response = await client.request("POST", url, "/", {}, b"")
        assert await response.__anext__() == b"hello"
        response.close()  # the client went away mid-stream
        task = asyncio.ensure_future(client.request("POST", url, "/", {}, b""))
        reader = await task
        reader_task = asyncio.ensure_future(reader.read())
        await asyncio.sleep(0.02)
        reader_task.cancel()  # a cancelled consumer
        with pytest.raises(asyncio.CancelledError):
            await reader_task
        reader.close()
        assert await post(client, url) == (200, b"hello" * 5)
        assert seen.connections == 3 and client.in_use == 0
        await client.close()


async def test_idle_connections_expire_after_keepalive() -> None:
    async with server(keep_alive) as (url, seen):
        client = http1.Client(5.0, keepalive=0.2)
        await post(client, url)
        await asyncio.sleep(0.35)
        await post(client, url)
        assert seen.connections == 2
        await asyncio.sleep(0.6)  # the sweep closes the idle one
        assert client.connections == 0
        await client.close()


async def test_invalid_answer() -> None:
    async def garbage(writer: asyncio.StreamWriter, seen: Seen) -> None:
        writer.write(b"SMTP ready\r\n\r\n")

    async with server(garbage) as (url, _):
        client = http1.Client(5.0)
        with pytest.raises(http1.InvalidResponse):
            await post(client, url)
        await client.close()


def test_base_urls() -> None:
    origin, prefix = http1.parse_base_url("https://api.example.com/openai/")
    assert (origin.host, origin.port, origin.host_header, prefix) == (
        "api.example.com",
        443,
        "api.example.com",
        "/openai",
    )
    origin, prefix = http1.parse_base_url("http://127.0.0.1:8001")
    assert (origin.port, origin.host_header, prefix) == (8001, "127.0.0.1:8001", "")
    assert http1.parse_base_url("http://[::1]:80")[0].host_header == "[::1]"
    with pytest.raises(ValueError):
        http1.parse_base_url("unix:/tmp/x.sock")
    with pytest.raises(ValueError):
        http1.request_head("POST", origin, "/", {"x": "a\r\nInjected: 1"}, 0)


@pytest.mark.parametrize(
    "case",
    [
        test_one_connection_serves_many_requests,
        test_an_idle_connection_the_server_closed_is_not_reused,
        test_a_stream_broken_off_raises_after_its_data,
        test_read_timeout_before_and_between_reads,
        test_connection_refused,
        test_back_pressure_stops_reading_a_stream_nobody_reads,
        test_a_stream_closed_before_its_end_is_not_reused,
    ],
)
def test_on_uvloop(case: Callable[[], Awaitable[None]]) -> None:
    """The gateway runs on uvloop, whose transports are not asyncio's."""
    import uvloop

    async def run() -> None:
        await case()

    uvloop.run(run())
