"""The usage filter: whatever the chunking, the client gets the bytes it would have got."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from gateway.config.reference import ModelSpec
from gateway.proxy.sse import UsageFilter, ask_for_usage, should_ask_for_usage, wants_usage


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


# -- framing: events end at a blank line, lines end with CRLF, LF or CR ----------------------------

FRAMINGS = {
    "lf": ("\n\n", "\n\n", "\n\n", "\n\n", "\n\n"),
    "crlf (sse-starlette)": ("\r\n\r\n", "\r\n\r\n", "\r\n\r\n", "\r\n\r\n", "\r\n\r\n"),
    "cr": ("\r\r", "\r\r", "\r\r", "\r\r", "\r\r"),
    "mixed": ("\r\n\r\n", "\r\r", "\n\r\n", "\r\r\n", "\r\n\n"),
    "mixed, cr last": ("\r\r\n", "\r\n\n", "\r\r", "\n\r", "\n\r"),
}


def streams(ends: tuple[str, ...]) -> tuple[bytes, bytes]:
    """(what the engine sends without usage, what it sends with include_usage) in one framing,
    with a comment event like sse-starlette's pings."""

    def ev(obj: object, end: str) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + end.encode()

    usage_event = {"id": "c1", "choices": [], "usage": USAGE, "system_fingerprint": "fp-9"}
    ping = b": ping" + ends[0].encode()
    plain = ping + ev(chunk("Hi"), ends[1]) + ev(chunk("!", "stop", "fp-9"), ends[2])
    with_usage = ping + ev(chunk("Hi"), ends[1]) + ev(chunk("!", "stop"), ends[2]) + ev(usage_event, ends[3])
    done = b"data: [DONE]" + ends[4].encode()
    return plain + done, with_usage + done


def chunkings(data: bytes) -> list[list[bytes]]:
    """Every cut into two pieces, byte by byte, and seeded random cuts."""
    out = [[data[:i], data[i:]] for i in range(len(data) + 1)]
    out.append([data[i : i + 1] for i in range(len(data))])
    rng = random.Random(len(data))
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(2, 12)))
        out.append([data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])])
    return out


def filtered(pieces: list[bytes], *, strip: bool) -> tuple[bytes, UsageFilter]:
    f = UsageFilter(strip=strip)
    return b"".join(f.feed(p) for p in pieces) + f.close(), f


@pytest.mark.parametrize("framing", FRAMINGS)
def test_every_framing_and_every_cut_gives_the_client_its_bytes(framing: str) -> None:
    plain, with_usage = streams(FRAMINGS[framing])
    for pieces in chunkings(with_usage):
        out, f = filtered(pieces, strip=True)
        assert out == plain, pieces
        assert f.usage == USAGE
        out, f = filtered(pieces, strip=False)
        assert out == with_usage, pieces
        assert f.usage == USAGE


@pytest.mark.parametrize("end", ["\r\n\r\n", "\r\r", "\n\n", "\n\r\n"])
def test_each_event_is_released_when_its_blank_line_arrives(end: str) -> None:
    """Not at the end of the stream (an sse-starlette endpoint was buffered to the end)."""
    first = b'data: {"choices":[{"delta":{"content":"Hi"},"finish_reason":null}]}' + end.encode()
    second = b'data: {"choices":[{"delta":{"content":"!"},"finish_reason":null}]}' + end.encode()
    for strip in (True, False):
        f = UsageFilter(strip=strip)
        assert f.feed(first) == first
        assert f.feed(second[:10]) == b""
        assert f.feed(second[10:]) == second


def test_an_lf_after_a_cr_at_the_end_of_a_chunk_stays_with_its_event() -> None:
    """`\\r` ends a line unless an `\\n` follows: a chunk that ends in `\\r` cannot tell yet."""
    terminal = b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\r\n\r'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1},"system_fingerprint":"fp"}\r\n\r'
    f = UsageFilter(strip=True)
    assert f.feed(terminal) == b""  # held for the usage event
    assert f.feed(b"\n" + usage) == (  # the LF went to the held event, then it was released
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],"system_fingerprint":"fp"}\r\n\r\n'
    )
    assert f.feed(b"\ndata: [DONE]\r\n\r\n") == b"data: [DONE]\r\n\r\n"  # that LF was the usage event's
    assert f.usage == {"prompt_tokens": 1}


def test_usage_is_asked_for_only_from_engines_the_gateway_runs() -> None:
    stream = {"model": "m", "stream": True}
    assert should_ask_for_usage(ModelSpec(id="m"), stream)
    assert not should_ask_for_usage(ModelSpec(id="m", endpoint="http://10.0.0.9:8000/v1"), stream)
    assert not should_ask_for_usage(ModelSpec(id="m"), {**stream, "stream_options": {"include_usage": True}})
    assert not should_ask_for_usage(ModelSpec(id="m"), {"model": "m"})
    assert should_ask_for_usage(ModelSpec(id="m"), {**stream, "stream_options": {"include_usage": False}})
