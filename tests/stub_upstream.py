"""A small OpenAI-compatible server standing in for vLLM in unit, API and benchmark runs.

Usable in-process (`make_app`, `serve_in_thread`) or as an engine command for LocalProvider:
    python tests/stub_upstream.py (--port N | --uds PATH) --served-name M [--ready-after S]
                                  [--children K] [--ignore-term] [--exit-after S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

STREAM_PIECES = ["Hello", " from", " the", " stub"]
FINGERPRINT = "stub-fp-1"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}},
        status_code=status,
    )


def make_app(
    served_name: str | None = None, *, ready_after: float = 0.0, chunk_delay: float = 0.0
) -> Starlette:
    started = time.monotonic()
    state: dict[str, Any] = {"requests": 0}

    async def health(_: Request) -> Response:
        ok = time.monotonic() - started >= ready_after
        return Response(status_code=200 if ok else 503)

    async def generate(request: Request, kind: str) -> Response:
        state["requests"] += 1
        state["authorization"] = request.headers.get("authorization")  # what the gateway forwarded
        body = await request.json()
        model = body.get("model")
        if served_name is not None and model != served_name:
            return _error(404, f"The model `{model}` does not exist.")
        prompt = json.dumps(body.get("messages") or body.get("prompt") or body.get("input"))
        if "please-fail" in prompt:
            return _error(400, "stub refuses this prompt")
        created = 1_700_000_000  # fixed, so responses compare byte for byte
        if kind == "embedding":
            data = [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]
            return JSONResponse(
                {
                    "object": "list",
                    "data": data,
                    "model": model,
                    "usage": {"prompt_tokens": 3, "total_tokens": 3},
                }
            )
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage") is True

            async def events() -> AsyncIterator[bytes]:
                # Like vLLM: compact JSON; the last content chunk carries finish_reason and, unless
                # usage was asked for, system_fingerprint; with usage, a final chunk without
                # choices carries usage and the fingerprint.
                last = len(STREAM_PIECES) - 1
                for n, piece in enumerate(STREAM_PIECES):
                    delta = {"content": piece} if kind == "chat" else None
                    choice: dict[str, Any] = (
                        {"index": 0, "delta": delta} if delta else {"index": 0, "text": piece}
                    )
                    choice["finish_reason"] = "stop" if n == last else None
                    chunk: dict[str, Any] = {
                        "id": "stub-1",
                        "object": f"{kind}.chunk",
                        "created": created,
                        "model": model,
                        "choices": [choice],
                    }
                    if n == last and not include_usage:
                        chunk["system_fingerprint"] = FINGERPRINT
                    yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
                    if chunk_delay:
                        await asyncio.sleep(chunk_delay)
                if include_usage:
                    usage = {
                        "id": "stub-1",
                        "object": f"{kind}.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
                        "system_fingerprint": FINGERPRINT,
                    }
                    yield f"data: {json.dumps(usage, separators=(',', ':'))}\n\n".encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        text = "".join(STREAM_PIECES)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            if kind == "chat"
            else {"index": 0, "text": text, "finish_reason": "stop"}
        )
        return JSONResponse(
            {
                "id": "stub-1",
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
            }
        )

    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await generate(request, "text_completion")

    async def embeddings(request: Request) -> Response:
        return await generate(request, "embedding")

    async def models(_: Request) -> Response:
        names = [served_name] if served_name is not None else []
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model"} for n in names]})

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models),
            Route("/invocations", chat, methods=["POST"]),  # open on vLLM without a front
        ]
    )
    app.state.counters = state
    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run an ASGI app with uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("stub server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int)
    where.add_argument("--uds", help="listen on this Unix socket instead, like `vllm serve --uds`")
    parser.add_argument("--served-name")
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--children", type=int, default=0, help="extra processes in the group, like vLLM's")
    parser.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM (tests SIGKILL)")
    parser.add_argument("--exit-after", type=float, default=None, help="exit with code 3 after S seconds")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed chunks")
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for _ in range(args.children):
        # Children stay in our process group; they ignore SIGTERM only if we do.
        child_cmd = [
            sys.executable,
            "-c",
            "import signal,time\n"
            + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if args.ignore_term else "")
            + "time.sleep(3600)",
        ]
        subprocess.Popen(child_cmd)
    if args.exit_after is not None:
        time.sleep(args.exit_after)
        print("stub: exiting with code 3 as asked", file=sys.stderr, flush=True)
        sys.exit(3)
    uvicorn.run(
        make_app(args.served_name, ready_after=args.ready_after, chunk_delay=args.chunk_delay),
        host="127.0.0.1",
        port=args.port or 8000,
        uds=args.uds,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
