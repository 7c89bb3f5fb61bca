"""/metrics scraped and parsed with prometheus-client's own parser after known requests."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.api.test_lifecycle import FakeClock
from tests.conftest import CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(all_samples: dict, name: str, **labels: str) -> float:
    return all_samples[(name, frozenset(labels.items()))]


async def test_metrics_after_known_requests(tmp_path: Path, stub_url: str) -> None:
    clock = FakeClock()
    provider = FakeProvider(endpoint=stub_url, clock=clock, launch_seconds=20, ready_seconds=30)
    settings = make_settings(tmp_path, costs={"default_gpu_hour": 3.6, "gpu_hour": {}})
    async with running_gateway(settings, provider, clock) as (app, client):
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=CHAT_BODY)).status_code == 200
        await client.post("/v1/chat/completions", json={**CHAT_BODY, "stream": True})
        await client.post(
            "/v1/chat/completions", json={**CHAT_BODY, "messages": [{"content": "please-fail"}]}
        )
        await client.post(
            "/v1/chat/completions", json={**CHAT_BODY, "model": "nope"}
        )  # 404: not a model's request
        await app.state.reaper.tick(clock.advance(100))  # the ledger
        await app.state.usage.flush()  # usage (tokens): flushed on its own period
        response = await client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        s = samples(response.text)
    path = "/v1/chat/completions"
    assert value(s, "llmgw_requests_total", model="org/chat", path=path, status="200") == 4
    assert value(s, "llmgw_requests_total", model="org/chat", path=path, status="400") == 1
    assert value(s, "llmgw_request_duration_seconds_count", model="org/chat") == 5
    # Overhead only for requests routed to a ready engine: not the one that waited for the cold start.
    assert value(s, "llmgw_gateway_overhead_seconds_count", model="org/chat") == 4
    assert value(s, "llmgw_cold_start_seconds_count", model="org/chat", phase="total") == 1
    assert value(s, "llmgw_cold_start_seconds_sum", model="org/chat", phase="launching") == 20
    assert value(s, "llmgw_cold_start_seconds_sum", model="org/chat", phase="loading") == 30
    assert value(s, "llmgw_deployments", state="ready") == 1
    assert value(s, "llmgw_gpus_in_use") == 1
    # 3 buffered answers and the stream (usage read from the engine), 5 + 4 tokens each.
    assert value(s, "llmgw_tokens_total", model="org/chat", kind="prompt") == 20
    assert value(s, "llmgw_tokens_total", model="org/chat", kind="completion") == 16
    assert (
        abs(value(s, "llmgw_cost_dollars_total", model="org/chat", phase="cold") - 0.05) < 1e-9
    )  # 50 s, $0.001/s
    assert abs(value(s, "llmgw_cost_dollars_total", model="org/chat", phase="serving") - 0.1) < 1e-9
    assert value(s, "llmgw_gpu_seconds_total", model="org/chat", phase="cold") == 50
    assert not [k for k in s if k[0] == "llmgw_requests_total" and ("model", "nope") in k[1]]
