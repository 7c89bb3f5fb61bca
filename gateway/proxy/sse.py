"""Token usage of streamed answers, read without changing what the client sees.

For a stream whose client did not ask for usage, the gateway sets
`stream_options.include_usage` towards the engine and this filter removes the extra usage event
again. vLLM then also moves `system_fingerprint` from the last content chunk to the usage
chunk; the filter puts it back where the client would have found it. Only events whose
`finish_reason` is set are held back (until the usage event right after them), so the first
chunks are never delayed.
"""

from __future__ import annotations

import json
from typing import Any

EVENT_END = b"\n\n"


def wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def ask_for_usage(payload: dict[str, Any]) -> bytes:
    """The request body with `stream_options.include_usage` set (compact JSON)."""
    options = payload.get("stream_options")
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps({**payload, "stream_options": merged}, separators=(",", ":")).encode()


def _is_terminal(event: bytes) -> bool:
    return b'"finish_reason"' in event and b'"finish_reason":null' not in event


def _usage_of(event: bytes) -> tuple[dict[str, Any], str | None] | None:
    """(usage, system_fingerprint) if `event` is the usage-only event (no choices)."""
    if not event.startswith(b"data: {") or b'"usage"' not in event:
        return None
    try:
        data = json.loads(event[6:])
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("choices") or not isinstance(data.get("usage"), dict):
        return None
    fingerprint = data.get("system_fingerprint")
    return data["usage"], fingerprint if isinstance(fingerprint, str) else None


def _with_fingerprint(event: bytes, fingerprint: str) -> bytes:
    body = event.rstrip()
    if not body.endswith(b"}") or b'"system_fingerprint"' in body:
        return event
    return body[:-1] + b',"system_fingerprint":' + json.dumps(fingerprint).encode() + b"}" + EVENT_END


class UsageFilter:
    """Feed engine chunks in, get client bytes out; `usage` is set once the engine reported it."""

    def __init__(self, *, strip: bool) -> None:
        self.strip = strip  # the client did not ask for usage: remove it again
        self.usage: dict[str, Any] | None = None
        self._partial = b""
        self._held: bytes | None = None  # a terminal event waiting for the usage event

    def feed(self, chunk: bytes) -> bytes:
        data = self._partial + chunk
        cut = data.rfind(EVENT_END)
        if cut < 0:
            self._partial = data
            return b""
        self._partial = data[cut + len(EVENT_END) :]
        out = []
        for raw in data[: cut + len(EVENT_END)].split(EVENT_END)[:-1]:
            out.append(self._event(raw + EVENT_END))
        return b"".join(out)

    def _event(self, event: bytes) -> bytes:
        found = _usage_of(event) if b'"usage"' in event else None
        if found is not None:
            self.usage, fingerprint = found
            if not self.strip:
                return self._release() + event
            held = self._held
            self._held = None
            if held is None:
                return b""
            return _with_fingerprint(held, fingerprint) if fingerprint else held
        released = self._release()
        if self.strip and _is_terminal(event):
            self._held = event
            return released
        return released + event

    def _release(self) -> bytes:
        held, self._held = self._held, None
        return held or b""

    def close(self) -> bytes:
        """Whatever is still held at the end of the stream."""
        rest = self._release() + self._partial
        self._partial = b""
        return rest
