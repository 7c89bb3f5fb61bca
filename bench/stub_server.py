"""A fast OpenAI-ish upstream for benchmarks: raw asyncio + httptools on uvloop, no framework.

It must cost far less per request than the gateway does, so that "gateway minus direct" measures
the gateway. Answers:
- `GET /health`: 200 (503 until `--ready-after` seconds have passed);
- `GET /v1/models`: the `--served-model-name` (what the gateway's readiness check looks for);
- `POST /v1/chat/completions` (and `/v1/completions`): a fixed chat completion, or with
  `"stream": true`, `--chunks` SSE events then `data: [DONE]`, each event its own write (chunked
  transfer encoding), the stream yielding to the event loop between events and pausing
  `--first-gap-ms` after the first one (like an engine's first token, then the rest);
- anything else: 404.

Run: python -m bench.stub_server --port N [--chunks 200] [--first-gap-ms 0] [--ready-after S]
     [--served-model-name NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from typing import cast

import httptools
import uvloop

COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "stub",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello from the benchmark stub"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
}


def _response(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 400: b"Bad Request", 503: b"Service Unavailable"}[status]
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
        % (status, reason, content_type, len(body))
        + body
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(index: int, model: str) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": f" tok{index}"}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


class StubProtocol(asyncio.Protocol):
    """One client connection; requests are answered in order (no pipelining needed)."""

    def __init__(self, app: StubApp) -> None:
        self.app = app
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.streaming: asyncio.Task[None] | None = None
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(_response(400, b"{}"))
            self.transport.close()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        transport = self.transport
        assert transport is not None
        path, body = self.url.split(b"?", 1)[0], b"".join(self.body)
        self.url, self.body = b"", []
        method = self.parser.get_method()
        # Read here: once the parser returned, it answers False whatever the request said.
        self.keep_alive = self.parser.should_keep_alive()
        if path == b"/health":
            transport.write(_response(200 if self.app.ready() else 503, b""))
        elif path == b"/v1/models":
            models = {"object": "list", "data": [{"id": self.app.served_name, "object": "model"}]}
            transport.write(_response(200, json.dumps(models).encode()))
        elif method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            try:
                payload = json.loads(body)
            except ValueError:
                transport.write(_response(400, b'{"error": "invalid json"}'))
                return
            model = str(payload.get("model", "stub"))
            if payload.get("stream"):
                self.streaming = asyncio.get_running_loop().create_task(self.stream(transport, model))
            else:
                transport.write(_response(200, self.app.completion(model)))
        else:
            transport.write(_response(404, b'{"error": "not found"}'))
        if not self.keep_alive and self.streaming is None:
            transport.close()

    async def stream(self, transport: asyncio.Transport, model: str) -> None:
        transport.write(STREAM_HEAD)
        for n, event in enumerate(self.app.events(model)):
            transport.write(_chunk(event))
            # one event per write and per loop turn, like a token stream
            await asyncio.sleep(self.app.first_gap if n == 0 else 0)
        transport.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        self.streaming = None
        if not self.keep_alive:
            transport.close()


class StubApp:
    def __init__(
        self, *, chunks: int, ready_after: float, first_gap: float = 0.0, served_name: str = "stub"
    ) -> None:
        self.served_name = served_name
        self.started = time.monotonic()
        self.ready_after = ready_after
        self.chunks = chunks
        self.first_gap = first_gap
        self._completions: dict[str, bytes] = {}
        self._events: dict[str, list[bytes]] = {}

    def ready(self) -> bool:
        return time.monotonic() - self.started >= self.ready_after

    def completion(self, model: str) -> bytes:
        cached = self._completions.get(model)
        if cached is None:
            cached = json.dumps({**COMPLETION, "model": model}).encode()
            self._completions[model] = cached
        return cached

    def events(self, model: str) -> list[bytes]:
        cached = self._events.get(model)
        if cached is None:
            cached = [_event(i, model) for i in range(self.chunks)]
            self._events[model] = cached
        return cached


async def serve(port: int, app: StubApp) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubProtocol(app), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=200, help="SSE events per streamed answer")
    parser.add_argument("--first-gap-ms", type=float, default=0.0, help="pause after a stream's first event")
    parser.add_argument("--ready-after", type=float, default=0.0, help="/health is 503 until then")
    parser.add_argument("--served-model-name", default="stub", help="the model /v1/models lists")
    args = parser.parse_args()
    app = StubApp(
        chunks=args.chunks,
        ready_after=args.ready_after,
        first_gap=args.first_gap_ms / 1000,
        served_name=args.served_model_name,
    )
    uvloop.run(serve(args.port, app))


if __name__ == "__main__":
    main()
