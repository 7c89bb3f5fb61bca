"""The OpenAI routes through the ASGI app, with a FakeProvider whose engines are a stub upstream."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx

from tasks.provider import CapacityError, ProviderError
from tests.conftest import CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider

CHAT = CHAT_BODY


def assert_envelope(response: httpx.Response, status: int, code: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["message"]
    return error


async def test_cold_chat_launches_once_then_serves_hot(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url, ready_delay=0.05)
    async with running_gateway(make_settings(tmp_path), provider) as (app, client):
        first = await client.post("/v1/chat/completions", json=CHAT)
        second = await client.post("/v1/chat/completions", json=CHAT)
        assert first.status_code == second.status_code == 200
        assert first.json()["choices"][0]["message"]["content"] == "Hello from the stub"
        assert len(provider.launches) == 1
        assert provider.launches[0].model == "org/chat"
        kinds = [e.kind for e in app.state.store.events(model="org/chat")]
        assert kinds == ["launch", "ready"]
        models = (await client.get("/v1/models")).json()["data"]
        assert {m["id"]: m["state"] for m in models} == {"org/chat": "ready", "pinned": "stopped"}


async def test_concurrent_cold_requests_share_one_launch(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url, launch_delay=0.2)
    async with running_gateway(make_settings(tmp_path), provider) as (_, client):
        responses = await asyncio.gather(*[client.post("/v1/chat/completions", json=CHAT) for _ in range(50)])
        assert [r.status_code for r in responses] == [200] * 50
        assert len(provider.launches) == 1


async def test_responses_pass_through_byte_for_byte(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    async with (
        running_gateway(make_settings(tmp_path), provider) as (_, client),
        httpx.AsyncClient() as direct,
    ):
        for body in (
            CHAT,
            {**CHAT, "stream": True},
            {**CHAT, "messages": [{"role": "user", "content": "please-fail"}]},
        ):
            via = await client.post("/v1/chat/completions", json=body)
            raw = await direct.post(f"{stub_url}/v1/chat/completions", json=body)
            assert via.status_code == raw.status_code
            assert via.content == raw.content
            assert via.headers["content-type"] == raw.headers["content-type"]
        completion = await client.post("/v1/completions", json={"model": "org/chat", "prompt": "x"})
        assert completion.json()["choices"][0]["text"] == "Hello from the stub"
        embedding = await client.post("/v1/embeddings", json={"model": "org/chat", "input": "x"})
        assert embedding.json()["data"][0]["embedding"] == [0.1, 0.2, 0.3]


async def test_engine_error_status_reaches_client_unchanged(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(make_settings(tmp_path), provider) as (_, client):
        bad = await client.post(
            "/v1/chat/completions", json={**CHAT, "messages": [{"content": "please-fail"}]}
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["message"] == "stub refuses this prompt"


async def test_cold_stream_sends_loading_comments_then_engine_events(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url, launch_delay=0.15, ready_delay=0.15)
    settings = make_settings(tmp_path, loading_comment_seconds=0.05)
    async with running_gateway(settings, provider) as (_, client):
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.text.split("\n\n") if line]
        comments = [line for line in lines if line.startswith(":")]
        assert len(comments) >= 3
        assert comments[0].startswith(": loading org/chat phase=")
        assert any("phase=launching" in c for c in comments) and any("phase=loading" in c for c in comments)
        assert all("elapsed=" in c for c in comments)
        data = [line for line in lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        pieces = [json.loads(d[6:])["choices"][0]["delta"]["content"] for d in data[:-1]]
        assert "".join(pieces) == "Hello from the stub"


async def test_cold_stream_launch_failure_is_an_error_event(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url, launch_error=ProviderError("weights not found"))
    async with running_gateway(make_settings(tmp_path), provider) as (_, client):
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        events = [e for e in response.text.split("\n\n") if e.startswith("data: ")]
        assert len(events) == 1
        error = json.loads(events[0][6:])["error"]
        assert error["code"] == "engine_start_failed"
        # Clients learn that it failed and where to look; the cause is for admins only.
        assert "weights not found" not in error["message"] and "/admin/failures" in error["message"]


async def test_launch_failure_reaches_every_waiter_and_is_recorded(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url, launch_delay=0.1, launch_error=ProviderError("boom"))
    async with running_gateway(make_settings(tmp_path), provider) as (app, client):
        responses = await asyncio.gather(*[client.post("/v1/chat/completions", json=CHAT) for _ in range(5)])
        for r in responses:
            assert_envelope(r, 502, "engine_start_failed")
        assert len(provider.launches) == 1
        await app.state.controller.settle()  # the runner ends after answering its waiters
        events = app.state.store.events(model="org/chat", kind="launch-failed")
        assert len(events) == 1 and "boom" in events[0].message
        [dep] = app.state.store.deployments(model="org/chat")
        assert dep.state == "failed" and dep.error == "boom" and dep.failed_at is not None


async def test_capacity_error_is_503_with_retry_after(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url, launch_error=CapacityError("all GPUs busy", tried=("local",)))
    async with running_gateway(make_settings(tmp_path), provider) as (_, client):
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert_envelope(response, 503, "capacity_unavailable")
        assert int(response.headers["retry-after"]) > 0


async def test_cold_start_timeout_stops_engine_and_answers_503(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url, ready_delay=30)
    settings = make_settings(tmp_path, cold_start_timeout_seconds=0.2)
    async with running_gateway(settings, provider) as (app, client):
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert_envelope(response, 503, "cold_start_timeout")
        assert "retry-after" in response.headers
        await app.state.controller.settle()  # the runner ends after answering its waiters
        assert [ref.deployment_id for ref in provider.stops] == [provider.launches[0].deployment_id]
        assert not provider.running
        [dep] = app.state.store.deployments(model="org/chat")
        assert dep.state == "failed"


async def test_wait_queue_is_bounded(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url, launch_delay=0.3)
    async with running_gateway(make_settings(tmp_path, max_waiting_requests=3), provider) as (_, client):
        responses = await asyncio.gather(*[client.post("/v1/chat/completions", json=CHAT) for _ in range(5)])
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 200, 503, 503]
        for r in responses:
            if r.status_code == 503:
                assert_envelope(r, 503, "queue_full")
                assert r.headers["retry-after"] == "5"
        again = await client.post("/v1/chat/completions", json=CHAT)  # the queue emptied when ready
        assert again.status_code == 200


async def test_gateway_errors_use_openai_envelope(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(make_settings(tmp_path, max_body_bytes=1000), provider) as (_, client):
        assert_envelope(
            await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}), 404, "model_not_found"
        )
        err = assert_envelope(
            await client.post("/v1/chat/completions", content=b"{not json"), 400, "invalid_json"
        )
        assert err["type"] == "invalid_request_error"
        err = assert_envelope(
            await client.post("/v1/chat/completions", json={"messages": []}), 400, "invalid_request"
        )
        assert err["param"] == "model"
        assert_envelope(await client.post("/v1/chat/completions", json=[1, 2]), 400, "invalid_request")
        assert_envelope(
            await client.post("/v1/chat/completions", json={**CHAT, "stream": "yes"}), 400, "invalid_request"
        )
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
        assert_envelope(await client.post("/v1/chat/completions", json=big), 413, "request_too_large")
        assert_envelope(await client.get("/v1/chat/completions"), 405, None)
        assert_envelope(await client.get("/v1/nothing-here"), 404, None)
        assert not provider.launches


async def test_unlisted_models_only_when_allowed_and_valid(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(make_settings(tmp_path, allow_unlisted_models=True), provider) as (_, client):
        for name in ["../etc/passwd", "a b", "x;rm -rf", "a" * 300, "mödel", "org/a/b"]:
            assert_envelope(
                await client.post("/v1/chat/completions", json={**CHAT, "model": name}),
                404,
                "model_not_found",
            )
        assert not provider.launches
        ok = await client.post("/v1/chat/completions", json={**CHAT, "model": "org/other"})
        assert ok.status_code == 200
        assert [s.model for s in provider.launches] == ["org/other"]
        assert provider.launches[0].gpus == 1 and provider.launches[0].priority == 0


async def test_external_endpoint_model_is_never_launched(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint="http://127.0.0.1:9")
    settings = make_settings(tmp_path, {"ext": {"endpoint": f"{stub_url}/v1"}})
    async with running_gateway(settings, provider) as (app, client):
        response = await client.post("/v1/chat/completions", json={**CHAT, "model": "ext"})
        assert response.status_code == 200
        assert not provider.launches
        models = (await client.get("/v1/models")).json()["data"]
        assert models[0]["state"] == "external"
        await app.state.reaper.tick(app.state.controller.clock())
        assert not provider.stops


async def test_unreachable_engine_is_502(tmp_path: Path) -> None:
    provider = FakeProvider(endpoint="http://127.0.0.1:9")
    async with running_gateway(make_settings(tmp_path), provider) as (_, client):
        assert_envelope(await client.post("/v1/chat/completions", json=CHAT), 502, "engine_error")


async def test_an_engine_that_closes_connections(tmp_path: Path) -> None:
    """An engine that closes its idle kept-alive connection: the next request goes on a new one;
    one that hangs up in the middle of a request: a 502 that names it."""
    answer = json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode()
    hang_up = asyncio.Event()

    async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        if not hang_up.is_set():
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(answer), answer)
            )
            await writer.drain()
        writer.close()  # idle, or in the middle of the request

    server = await asyncio.start_server(engine, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    provider = FakeProvider(endpoint=f"http://127.0.0.1:{port}")
    try:
        async with running_gateway(make_settings(tmp_path), provider) as (_, client):
            for _ in range(3):
                response = await client.post("/v1/chat/completions", json=CHAT)
                assert response.status_code == 200 and response.content == answer
                await asyncio.sleep(0.05)  # the engine closed the idle connection meanwhile
            hang_up.set()
            error = assert_envelope(await client.post("/v1/chat/completions", json=CHAT), 502, "engine_error")
            assert error["message"] == "The engine for org/chat did not answer: ServerDisconnected"
    finally:
        server.close()


async def test_usage_recorded_off_the_request_path(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(make_settings(tmp_path), provider) as (app, client):
        await client.post("/v1/chat/completions", json=CHAT)
        await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        store = app.state.store
        assert store.usage_count() == 0  # nothing written per request
        await app.state.reaper.tick(app.state.controller.clock())  # last-used times
        await app.state.usage.flush()  # usage has its own period
        assert store.usage_count(model="org/chat") == 2
        model = store.get_model("org/chat")
        assert model is not None and model.last_used_at is not None


async def test_health_and_openapi(tmp_path: Path, stub_url: str) -> None:
    async with running_gateway(make_settings(tmp_path), FakeProvider(endpoint=stub_url)) as (_, client):
        assert (await client.get("/health")).json() == {"status": "ok"}
        spec = (await client.get("/openapi.json")).json()
        assert spec["info"]["title"] == "llm-gateway"
        chat = spec["paths"]["/v1/chat/completions"]["post"]
        assert chat["description"]
        assert chat["requestBody"]["content"]["application/json"]["example"]["model"] == "tiny-llama"
        assert "503" in chat["responses"]
        docs = await client.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
