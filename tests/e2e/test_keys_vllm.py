"""Client API keys in front of a real vLLM engine, driven with the official `openai` client:
a valid key chats, a wrong one gets OpenAI's 401, a key that may not wake a model waits for
someone who may, and the run's cost is split by team."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.e2e.conftest import GatewayProcess, wait_until

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Hello, who are you?"}]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def create_key(gw: GatewayProcess, **fields: Any) -> dict[str, Any]:
    r = httpx.post(f"{gw.base_url}/admin/keys", headers=ADMIN, json=fields, timeout=10)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def client(gw: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, timeout=300, max_retries=0)


def costs(gw: GatewayProcess, group_by: str, until: str | None = None) -> list[dict[str, Any]]:
    params = {"group_by": group_by, **({"until": until} if until else {})}
    r = httpx.get(f"{gw.base_url}/admin/costs", headers=ADMIN, params=params, timeout=10)
    assert r.status_code == 200, r.text
    rows: list[dict[str, Any]] = r.json()
    return rows


def test_keys_chat_refuse_and_split_the_cost_by_team(gateway_factory: Any) -> None:
    # $36 per GPU-hour ($0.01 a second), so a run of a minute has cents to split.
    gw: GatewayProcess = gateway_factory(client_auth="keys", costs={"local_gpu_hour": 36.0})
    research = create_key(gw, name="notebooks", team="research")
    product = create_key(gw, name="chat-app", team="product", requests_per_minute=100)
    watcher = create_key(gw, name="dashboard", team="product", may_wake=False)

    with pytest.raises(openai.AuthenticationError) as wrong:
        client(gw, "sk-gw-" + "x" * 43).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert wrong.value.code == "invalid_api_key"
    with pytest.raises(openai.InternalServerError) as cold:
        client(gw, watcher["key"]).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert cold.value.status_code == 503 and cold.value.code == "model_not_running"

    t0 = time.monotonic()
    chat = client(gw, research["key"]).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)  # type: ignore[arg-type]
    print(f"cold chat with a key: {time.monotonic() - t0:.1f}s")
    assert chat.choices[0].message.content and chat.usage is not None
    for _ in range(3):
        stream = client(gw, product["key"]).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=16,
            stream=True,
        )
        assert any(ch.choices and ch.choices[0].delta.content for ch in stream)
    served = client(gw, watcher["key"]).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert served.choices[0].message.content  # running now: a key without wake is served
    assert [m.id for m in client(gw, product["key"]).models.list()] == [MODEL]

    # Usage is flushed and the ledger labels serving time every couple of seconds.
    assert wait_until(lambda: {r["team"] for r in costs(gw, "team")} >= {"research", "product"}, 30)
    until = datetime.now(UTC).isoformat()  # one instant for both (open intervals count up to it)
    by_team, by_model = costs(gw, "team", until), costs(gw, "model", until)
    total = sum(r["dollars"] for r in by_model)
    assert sum(r["dollars"] for r in by_team) == pytest.approx(total, abs=1e-5)
    [research_row] = [r for r in by_team if r["team"] == "research"]
    assert research_row["cold_dollars"] == pytest.approx(sum(r["cold_dollars"] for r in by_model), abs=1e-5)
    print("cost by team (a real run, $36/GPU-hour):")
    print(f"{'team':<10} {'dollars':>9} {'cold':>9} {'serving':>9} {'idle':>9}")
    for r in by_team:
        print(
            f"{r['team']:<10} {r['dollars']:>9.4f} {r['cold_dollars']:>9.4f} "
            f"{r['serving_dollars']:>9.4f} {r['idle_dollars']:>9.4f}"
        )
    log = gw.log.read_text()
    for key in (research, product, watcher):
        assert key["key"] not in log
