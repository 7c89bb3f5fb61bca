"""The real gateway in front of a real vLLM engine, driven with the official `openai` client."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import signal
import time
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.e2e.conftest import GatewayProcess, wait_until

MODEL = "tiny-llama"
# uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -SIGTERM is a clean exit.
CLEAN_EXIT = {0, -signal.SIGTERM}
MESSAGES = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def hot_gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """One gateway (and engine) per store: SQLite in its data_dir, a database on PostgreSQL."""
    from tests.e2e.conftest import start_gateway

    database: dict[str, str] = {}
    if request.param == "postgresql":
        database["database_url"] = request.getfixturevalue("postgres").create_database()
    gw = start_gateway(tmp_path_factory.mktemp("hot"), **database)
    try:
        yield gw
    finally:
        try:
            assert gw.terminate(timeout=60) in CLEAN_EXIT
            assert gw.live_engine_groups() == []
        finally:
            gw.kill_everything()


def client(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="unused", timeout=300, max_retries=0)


def test_cold_chat_then_stream_then_completion(hot_gateway: GatewayProcess) -> None:
    c = client(hot_gateway)
    t0 = time.monotonic()
    chat = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)  # type: ignore[arg-type]
    cold = time.monotonic() - t0
    assert chat.model == MODEL
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    events = hot_gateway.store().events(model=MODEL)
    assert [e.kind for e in events] == ["launch", "ready"]
    print(f"cold chat through the gateway: {cold:.1f}s")

    stream = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    assert len(chunks) >= 2
    assert any(ch.choices and ch.choices[0].delta.content for ch in chunks)
    assert chunks[-1].choices[0].finish_reason in {"length", "stop"}

    completion = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    assert completion.choices[0].text
    models = {m.id: m for m in c.models.list()}
    assert models[MODEL].model_extra is not None and models[MODEL].model_extra["state"] == "ready"
    assert len(hot_gateway.engine_groups()) == 1


def test_unknown_model_is_404_envelope(hot_gateway: GatewayProcess) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(hot_gateway).chat.completions.create(model="no-such-model", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.code == "model_not_found"
    assert info.value.body is not None


def test_engine_errors_reach_the_client(hot_gateway: GatewayProcess) -> None:
    with pytest.raises(openai.BadRequestError):  # longer than the engine's max_model_len (256)
        client(hot_gateway).completions.create(model=MODEL, prompt="hello " * 400, max_tokens=8)


def test_herd_idle_teardown_and_sigterm(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw: GatewayProcess = gateway_factory(keep_hot_seconds=3, reaper_interval_seconds=0.5)

    async def herd() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=f"{gw.base_url}/v1", api_key="x", timeout=300, max_retries=0
        ) as ac:
            results = await asyncio.gather(
                *[
                    ac.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
                    for _ in range(50)
                ]
            )
        return [r.choices[0].message.content or "" for r in results]

    answers = asyncio.run(herd())
    assert len(answers) == 50
    store = gw.store()
    assert len(store.events(model=MODEL, kind="launch")) == 1
    [pgid] = gw.engine_groups()

    # Idle teardown: keep_hot_seconds=3, the reaper stops the engine and its process group is gone.
    assert wait_until(lambda: store.events(model=MODEL, kind="idle-stop") != [], timeout=30)
    assert wait_until(lambda: gw.live_engine_groups() == [], timeout=30)
    assert wait_until(lambda: store.deployments(model=MODEL)[0].state == "stopped", timeout=10)

    # A new request starts a new engine; SIGTERM to the gateway leaves no engine behind.
    c = client(gw)
    assert c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4).choices  # type: ignore[arg-type]
    groups = gw.engine_groups()
    assert len(groups) == 2 and pgid in groups
    assert gw.live_engine_groups() != []
    gw.process.send_signal(signal.SIGTERM)
    assert gw.process.wait(timeout=60) in CLEAN_EXIT
    assert "gateway stopped" in gw.log.read_text()
    assert gw.live_engine_groups() == []
    assert all(d.state == "stopped" for d in store.deployments(model=MODEL))


def test_stream_usage_is_read_without_changing_what_the_client_sees(hot_gateway: GatewayProcess) -> None:
    """Against real vLLM: the gateway asks for usage; the client's events are the engine's own."""
    import json

    import httpx

    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True}
    client(hot_gateway).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)  # warm
    [dep] = [d for d in hot_gateway.store().deployments(model=MODEL) if d.state == "ready"]

    key = hmac.new(ADMIN_TOKEN.encode(), dep.id.encode(), hashlib.sha256).hexdigest()  # the engine's own

    def events(url: str) -> list[dict]:
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {key}"}) as http:
            text = http.post(f"{url}/v1/chat/completions", json=body).text
        out = []
        for line in text.split("\n\n"):
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                event.pop("id"), event.pop("created")
                out.append(event)
        return out

    direct, via = events(dep.endpoint), events(hot_gateway.base_url)

    # vLLM may put several tokens in one chunk when its steps run late (a loaded machine), so
    # the two runs are compared by what they say, not by where their chunks happen to break.
    def said(evs: list[dict]) -> tuple:
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in evs if e["choices"])
        return text, evs[-1]["choices"][0]["finish_reason"], sorted({k for e in evs for k in e})

    assert said(via) == said(direct)
    assert all("usage" not in e for e in via)
    assert via[-1].get("system_fingerprint")  # where vLLM puts it without usage

    def streamed() -> list:
        return [u for u in hot_gateway.store().usage_minutes(model=MODEL) if u.stream and u.status == 200]

    assert wait_until(lambda: streamed() != [], timeout=10)  # usage is written in batches
    assert sum(u.completion_tokens for u in streamed()) and sum(u.prompt_tokens for u in streamed())
