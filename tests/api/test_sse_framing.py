"""An external endpoint that frames its events with CRLF (sse-starlette's default): through a
real gateway (uvicorn on 127.0.0.1), each event reaches the client when the endpoint sends it,
not at the end of the stream, and the bytes are the endpoint's."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from gateway.app import create_app
from tests.conftest import CHAT_BODY, make_settings
from tests.fakes import FakeProvider
from tests.stub_upstream import serve_in_thread


def event(content: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
    data = {"id": "x1", "object": "chat.completion.chunk", "created": 1, "model": "ext", "choices": [choice]}
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\r\n\r\n"


FIRST = event("Hello")
REST = event(" there") + event("!", "stop") + b": ping\r\n\r\n" + b"data: [DONE]\r\n\r\n"


def crlf_endpoint(release: threading.Event) -> Starlette:
    async def chat(request: Request) -> StreamingResponse:
        await request.body()

        async def events() -> AsyncIterator[bytes]:
            yield FIRST
            await asyncio.to_thread(release.wait, 10)  # the rest only once the client has the first
            yield REST

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


async def test_crlf_events_are_relayed_as_they_come(tmp_path: Path) -> None:
    release = threading.Event()
    with serve_in_thread(crlf_endpoint(release)) as endpoint:
        settings = make_settings(tmp_path, {"ext": {"endpoint": endpoint}})
        with serve_in_thread(create_app(settings, provider=FakeProvider())) as gateway:
            body = {**CHAT_BODY, "model": "ext", "stream": True}
            async with (
                httpx.AsyncClient(timeout=15) as client,
                client.stream("POST", f"{gateway}/v1/chat/completions", json=body) as r,
            ):
                assert r.status_code == 200
                received = b""
                chunks = r.aiter_raw()
                while len(received) < len(FIRST):
                    received += await asyncio.wait_for(anext(chunks), timeout=5)
                assert received == FIRST  # before the endpoint sent anything else
                release.set()
                async for chunk in chunks:
                    received += chunk
    assert received == FIRST + REST
