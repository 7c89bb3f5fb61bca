"""Token usage of streamed answers, read without changing what the client sees.

For a stream to an engine the gateway runs, whose client did not ask for usage, the gateway
sets `stream_options.include_usage` towards the engine (`should_ask_for_usage`) and this
filter removes the extra usage event again. vLLM then also moves `system_fingerprint` from the
last content chunk to the usage chunk; the filter puts it back where the client would have
found it. Only events whose `finish_reason` is set are held back (until the usage event right
after them), so the first chunks are never delayed. Bodies for external endpoints are
forwarded untouched: the filter only reads the usage they send.

Events end at a blank line, and lines end with CRLF, LF or CR (the SSE spec; sse-starlette
writes CRLF): the filter cuts events at any of these and gives the bytes back as they came.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway.config.reference import ModelSpec

# A line end followed by an empty line: `\r(?!\n)` so that CRLF is one line end, not two.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LOOK_BACK = 3  # a boundary is at most 4 bytes: a new chunk can complete one begun 3 bytes back


def _one_lf_event(chunk: bytes) -> bool:
    """`chunk` is exactly one event, framed with LF."""
    return chunk.endswith(b"\n\n") and chunk.find(b"\n\n") == len(chunk) - 2 and b"\r" not in chunk


def wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def should_ask_for_usage(spec: ModelSpec, payload: dict[str, Any]) -> bool:
    """Whether to send `ask_for_usage(payload)` instead of the client's body (and strip the
    usage event again): only for streams to engines the gateway runs, never to an external
    `endpoint` (its bodies are forwarded untouched), and not if the client asked itself."""
    return spec.endpoint is None and payload.get("stream") is True and not wants_usage(payload)


def ask_for_usage(payload: dict[str, Any]) -> bytes:
    """The request body with `stream_options.include_usage` set (compact JSON)."""
    options = payload.get("stream_options")
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps({**payload, "stream_options": merged}, separators=(",", ":")).encode()


def _is_terminal(event: bytes) -> bool:
    return b'"finish_reason"' in event and b'"finish_reason":null' not in event


def _data_of(event: bytes) -> bytes | None:
    """The value of an event that is one `data:` line, else None."""
    if not event.startswith(b"data:"):
        return None
    value = event[5:].rstrip(b"\r\n")
    value = value[1:] if value.startswith(b" ") else value
    return None if b"\n" in value or b"\r" in value else value


def _usage_of(event: bytes) -> tuple[dict[str, Any], str | None] | None:
    """(usage, system_fingerprint) if `event` is the usage-only event (no choices)."""
    value = _data_of(event)
    if value is None or not value.startswith(b"{"):
        return None
    try:
        data = json.loads(value)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("choices") or not isinstance(data.get("usage"), dict):
        return None
    fingerprint = data.get("system_fingerprint")
    return data["usage"], fingerprint if isinstance(fingerprint, str) else None


def _with_fingerprint(event: bytes, fingerprint: str) -> bytes:
    body = event.rstrip(b"\r\n")
    end = event[len(body) :]  # the event's own line ends, kept as they came
    if not body.endswith(b"}") or b'"system_fingerprint"' in body:
        return event
    return body[:-1] + b',"system_fingerprint":' + json.dumps(fingerprint).encode() + b"}" + end


class UsageFilter:
    """Feed engine chunks in, get client bytes out; `usage` is set once the engine reported it."""

    def __init__(self, *, strip: bool) -> None:
        self.strip = strip  # the gateway asked for usage: remove it again
        self.usage: dict[str, Any] | None = None
        self._partial = b""
        self._held: bytes | None = None  # a terminal event waiting for the usage event
        # The data so far ended with an event (`_cr_event`) whose last byte is a CR: if the next
        # byte is an LF, it is that CR's CRLF and goes where the event went.
        self._after_cr = False
        self._cr_event = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self._partial and not self._after_cr and _one_lf_event(chunk):
            return self._event(chunk)  # what vLLM sends: one event per chunk
        lf = b""
        if self._after_cr and chunk:
            self._after_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
                lf = self._lf_of_last_event()
        data = self._partial + chunk
        pos = max(0, len(self._partial) - _LOOK_BACK)
        if b"\r" in data:
            ends = [found.end() for found in _EVENT_END.finditer(data, pos)]
            if ends and ends[-1] == len(data) and data.endswith(b"\r"):
                self._after_cr = True
                self._cr_event = data[ends[-2] if len(ends) > 1 else 0 :]
        else:  # vLLM's framing: bytes.find is ten times faster than the regular expression
            ends = []
            at = data.find(b"\n\n", pos)
            while at >= 0:
                ends.append(at + 2)
                at = data.find(b"\n\n", at + 2)
        if not ends:
            self._partial = data
            return lf
        out, start = [lf], 0
        for end in ends:
            out.append(self._event(data[start:end]))
            start = end
        self._partial = data[start:]
        return b"".join(out)

    def _lf_of_last_event(self) -> bytes:
        """The LF of the CRLF that ended the last event: it goes where that event went."""
        if self._held is not None:  # it is the held one (any other event releases it)
            self._held += b"\n"
            return b""
        dropped = self.strip and _usage_of(self._cr_event) is not None
        return b"" if dropped else b"\n"

    def _event(self, event: bytes) -> bytes:
        found = _usage_of(event) if b'"usage"' in event else None
        if found is not None:
            self.usage, fingerprint = found
            if not self.strip:
                return self._release() + event
            held = self._release()
            return _with_fingerprint(held, fingerprint) if held and fingerprint else held
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
