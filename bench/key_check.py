"""What a client API key adds to a request: the gateway's own work before the engine call
(`OpenAIGateway.respond` up to the proxied response: key check, body, parse, model, limits),
with `client_auth: keys` vs `open`, in one process, batch by batch alternately.

The keyed gateway holds 1,000 keys in its cache, and the request's key has a request and a
token limit and a monthly budget: every check runs. No engine is called (the model has an
external endpoint, so `respond` returns at once), so the difference is the check alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import median

from starlette.datastructures import Headers
from starlette.types import Message

from bench.report import BenchResult, Row, Target
from bench.suite import Context
from gateway.auth.keys import hash_key, new_key_id, new_secret
from gateway.clock import system_clock
from gateway.config.settings import Settings
from gateway.runtime import Runtime
from state import ApiKey
from tests.fakes import FakeProvider

NAME = "key_check"
ADDED_TARGET_US = 20.0
MODEL = "org/remote"
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()


def runtime(root: Path, client_auth: str) -> Runtime:
    reference = root / "model_reference.json"
    reference.write_text(json.dumps({MODEL: {"endpoint": "http://127.0.0.1:9"}}))
    settings = Settings(
        data_dir=root / "data",
        model_reference=reference,
        admin_token="bench-admin-token-0123456789",
        client_auth=client_auth,
        after_hours=None,
    )
    return Runtime.build(settings, provider=FakeProvider(endpoint="http://127.0.0.1:9"), clock=system_clock)


def fill_keys(rt: Runtime, count: int) -> str:
    """`count` keys in the cache; returns the secret of one with every limit set."""
    now = datetime.now(UTC)
    secrets = [new_secret() for _ in range(count)]
    rows = [
        ApiKey(id=new_key_id(), key_hash=hash_key(s), name=f"k{i}", team="t", created_at=now)
        for i, s in enumerate(secrets)
    ]
    used = rows[count // 2]
    used.models = '["team-a/*", "org/*"]'
    used.requests_per_minute = used.tokens_per_minute = 10**12
    used.monthly_budget = 10**9
    rt.keys.install(rows)
    return secrets[count // 2]


async def per_call_us(rt: Runtime, headers: Headers, n: int) -> float:
    async def receive() -> Message:
        return {"type": "http.request", "body": BODY, "more_body": False}

    respond = rt.gateway.respond
    t0 = time.perf_counter()
    for _ in range(n):
        await respond("/v1/chat/completions", headers, receive)
    return (time.perf_counter() - t0) / n * 1e6


def check_us(rt: Runtime, authorization: str, n: int) -> float:
    keys = rt.keys
    t0 = time.perf_counter()
    for _ in range(n):
        keys.admit(keys.authenticate(authorization), MODEL)  # type: ignore[arg-type]
    return (time.perf_counter() - t0) / n * 1e6


async def measure(ctx: Context) -> dict[str, list[float]]:
    (ctx.workdir / "open").mkdir()
    (ctx.workdir / "keys").mkdir()
    opened, keyed = runtime(ctx.workdir / "open", "open"), runtime(ctx.workdir / "keys", "keys")
    secret = fill_keys(keyed, 1000)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
    with_key = Headers(raw=[*raw, (b"authorization", f"Bearer {secret}".encode())])
    without = Headers(raw=raw)
    n, turns = ctx.pick(2000, 300), ctx.pick(30, 5)
    out: dict[str, list[float]] = {"open_us": [], "keys_us": [], "check_us": []}
    for turn in range(turns):
        pair = [(opened, without, "open_us"), (keyed, with_key, "keys_us")]
        for rt, headers, name in pair if turn % 2 == 0 else pair[::-1]:
            out[name].append(await per_call_us(rt, headers, n))
        out["check_us"].append(check_us(keyed, f"Bearer {secret}", n))
    for rt in (opened, keyed):
        rt.store.close()
    return out


def run(ctx: Context) -> BenchResult:
    raw = asyncio.run(measure(ctx))
    opened, keyed, check = median(raw["open_us"]), median(raw["keys_us"]), median(raw["check_us"])
    rows = [
        Row(
            NAME,
            "key check added per request",
            keyed - opened,
            "µs",
            baseline=f"client_auth open {opened:.1f} µs",
            subject=f"keys {keyed:.1f} µs",
            target=Target("<=", ADDED_TARGET_US, "µs"),
            note=f"OpenAIGateway.respond before the engine call, median of {len(raw['keys_us'])} alternating "
            f"batches; 1,000 keys cached, the key with request, token and budget limits; the check alone "
            f"(authenticate + admit) {check:.1f} µs",
        )
    ]
    return BenchResult(NAME, rows=rows, raw=raw)
