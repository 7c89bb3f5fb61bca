"""The usage filter: whatever the chunking, the client gets the bytes it would have got."""

from __future__ import annotations

import json

import pytest

from gateway.proxy.sse import UsageFilter, ask_for_usage, wants_usage


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chunk(text: str, finish: str | None = None, fingerprint: str | None = None) -> dict:
    out: dict = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }
    if fingerprint:
        out["system_fingerprint"] = fingerprint
    return out


USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
# What the engine sends without usage, and with include_usage (fingerprint moved to the usage event).
PLAIN = event(chunk("Hi")) + event(chunk("!", "stop", "fp-9")) + b"data: [DONE]\n\n"
WITH_USAGE = (
    event(chunk("Hi"))
    + event(chunk("!", "stop"))
    + event(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [],
            "usage": USAGE,
            "system_fingerprint": "fp-9",
        }
    )
    + b"data: [DONE]\n\n"
)


def run(data: bytes, size: int, *, strip: bool) -> tuple[bytes, UsageFilter]:
    f = UsageFilter(strip=strip)
    out = b"".join(f.feed(data[i : i + size]) for i in range(0, len(data), size)) + f.close()
    return out, f


@pytest.mark.parametrize("size", [1, 2, 7, 50, 10_000])
def test_stripped_usage_gives_the_plain_stream_back(size: int) -> None:
    out, f = run(WITH_USAGE, size, strip=True)
    assert out == PLAIN
    assert f.usage == USAGE


@pytest.mark.parametrize("size", [3, 10_000])
def test_usage_the_client_asked_for_passes_through(size: int) -> None:
    out, f = run(WITH_USAGE, size, strip=False)
    assert out == WITH_USAGE
    assert f.usage == USAGE


def test_first_chunks_are_not_held_back() -> None:
    f = UsageFilter(strip=True)
    first = event(chunk("Hi"))
    assert f.feed(first) == first  # released at once
    terminal = event(chunk("!", "stop"))
    assert f.feed(terminal) == b""  # held until the usage event
    assert f.feed(b"data: [DONE]\n\n") == terminal + b"data: [DONE]\n\n"  # no usage came: released as is


def test_engine_without_usage_support_and_request_rewrite() -> None:
    out, f = run(PLAIN, 5, strip=True)
    assert out == PLAIN and f.usage is None
    payload = {"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": False}}
    assert not wants_usage(payload)
    rewritten = json.loads(ask_for_usage(payload))
    assert rewritten["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert wants_usage(rewritten)
