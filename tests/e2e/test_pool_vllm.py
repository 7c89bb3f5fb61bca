"""Two real vLLM models on a pool of one GPU slot: the higher priority takes the slot over."""

from __future__ import annotations

import openai

from tests.e2e.conftest import GatewayProcess

MESSAGES = [{"role": "user", "content": "Hello"}]


def chat(gw: GatewayProcess, model: str) -> str:
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="x", timeout=300, max_retries=0)
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    return reply.model


def test_priority_one_evicts_priority_zero_and_not_the_reverse(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    # start_gateway's pool has one GPU slot (local.gpu_ids: ["0"]); the engines run on the CPU.
    gw: GatewayProcess = gateway_factory(models={"tiny-low": {"priority": 0}, "tiny-high": {"priority": 1}})
    assert chat(gw, "tiny-low") == "tiny-low"
    [low_group] = gw.live_engine_groups()
    assert chat(gw, "tiny-high") == "tiny-high"  # no free slot: takes over tiny-low's
    store = gw.store()
    [evicted] = store.events(model="tiny-low", kind="evicted")
    assert "evicted by tiny-high" in evicted.message
    assert store.events(model="tiny-high", kind="takeover")
    live = gw.live_engine_groups()
    assert len(live) == 1 and low_group not in live  # the old engine's process group is gone
    assert store.deployments(model="tiny-low")[0].state == "stopped"

    # The reverse: tiny-low may not evict the higher-priority model.
    try:
        chat(gw, "tiny-low")
        raise AssertionError("tiny-low should not get the slot")
    except openai.APIStatusError as exc:
        assert exc.status_code == 503
        assert exc.response.headers.get("retry-after")
        assert exc.body is not None and exc.body.get("code") == "capacity_unavailable"  # type: ignore[union-attr]
    assert store.deployments(model="tiny-high")[0].state == "ready"
