"""`llm-gateway admin ...` against a real gateway served by uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.cli.admin import utc_time
from gateway.cli.main import app as cli
from tasks.provider import ProviderError
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.fakes import FakeProvider
from tests.stub_upstream import serve_in_thread

MODELS = {"org/chat": {}, "meta-llama/Llama-3.1-8B-Instruct": {"priority": 1}}


@pytest.fixture
def gateway_url(tmp_path: Path, stub_url: str) -> Iterator[str]:
    app = create_app(make_settings(tmp_path, MODELS), provider=FakeProvider(endpoint=stub_url))
    with serve_in_thread(app) as url:
        yield url


def run(url: str, *args: str, token: str = ADMIN_TOKEN) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["admin", "--url", url, *args], env={"LLMGW_ADMIN_TOKEN": token})
    return result.exit_code, result.output


def test_cli_mirrors_the_api(gateway_url: str) -> None:
    code, out = run(gateway_url, "models")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATE", "PRIORITY"]
    assert any(line.startswith("meta-llama/Llama-3.1-8B-Instruct") and " stopped " in line for line in lines)

    code, out = run(gateway_url, "load", "meta-llama/Llama-3.1-8B-Instruct", "--wait")
    assert code == 0 and json.loads(out) == {"model": "meta-llama/Llama-3.1-8B-Instruct", "state": "ready"}
    code, out = run(
        gateway_url, "set", "meta-llama/Llama-3.1-8B-Instruct", "--priority", "2", "--keep-hot", "30"
    )
    assert code == 0 and json.loads(out)["priority"] == 2
    code, out = run(gateway_url, "--json", "models")
    assert {m["id"]: m["state"] for m in json.loads(out)}["meta-llama/Llama-3.1-8B-Instruct"] == "ready"
    code, out = run(gateway_url, "clusters")
    assert code == 0 and "fake-" in out and "running" in out
    code, out = run(gateway_url, "events", "--model", "meta-llama/Llama-3.1-8B-Instruct")
    assert code == 0 and "launch" in out and "ready" in out
    assert run(gateway_url, "info")[0] == 0
    code, out = run(gateway_url, "failures")
    assert code == 0 and "(none)" in out
    assert run(gateway_url, "reset-failure")[0] == 0
    assert run(gateway_url, "reload")[0] == 0
    code, out = run(gateway_url, "unload", "meta-llama/Llama-3.1-8B-Instruct")
    assert code == 0 and json.loads(out)["stopped"] is True
    code, out = run(gateway_url, "reset")
    assert code == 0


def test_cli_errors(gateway_url: str) -> None:
    code, out = run(gateway_url, "models", token="wrong")
    assert code == 1 and "401" in out
    code, out = run(gateway_url, "model", "org/none")
    assert code == 1 and "404" in out
    code, out = run("http://127.0.0.1:9", "models")
    assert code == 1 and "cannot reach" in out
    result = CliRunner().invoke(cli, ["admin", "models"], env={"LLMGW_ADMIN_TOKEN": ""})
    assert result.exit_code == 2


def test_cli_times_without_a_zone_are_utc(gateway_url: str) -> None:
    assert run(gateway_url, "load", "org/chat", "--wait")[0] == 0  # events now
    today = datetime.now(UTC).date().isoformat()
    code, out = run(gateway_url, "events", "--model", "org/chat", "--since", today)  # midnight UTC
    assert code == 0 and "launch" in out and "ready" in out
    code, out = run(gateway_url, "events", "--model", "org/chat", "--until", f"{today}T00:00")
    assert code == 0 and "(none)" in out
    code, out = run(gateway_url, "costs", "--since", today, "--until", "2999-01-01")
    assert code == 0 and "org/chat" in out
    for option in ("--since", "--until"):
        code, out = run(gateway_url, "events", option, "yesterday")
        assert code == 2 and option in out and "ISO 8601" in out


def test_cli_sends_utc_times() -> None:
    assert utc_time("2026-11-27") == "2026-11-27T00:00:00+00:00"
    assert utc_time("2026-11-27T10:00") == "2026-11-27T10:00:00+00:00"
    assert utc_time("2026-11-27T10:00:00.5-06:00") == "2026-11-27T16:00:00.500000+00:00"
    assert utc_time("2026-11-27T10:00Z") == "2026-11-27T10:00:00+00:00"
    assert utc_time(None) is None


def test_cli_tables_show_values_as_they_are(tmp_path: Path, stub_url: str) -> None:
    """Text that looks like rich markup (`[Errno 111]`, `[bold]`) is printed, not interpreted."""
    error = "[bold]engine[/bold] said [Errno 111] Connection refused"
    provider = FakeProvider(endpoint=stub_url, launch_error=ProviderError(error))
    with serve_in_thread(create_app(make_settings(tmp_path, MODELS), provider=provider)) as url:
        assert run(url, "load", "org/chat", "--wait")[0] == 1
        code, out = run(url, "failures")
    assert code == 0 and error in out
    assert out.splitlines()[0].split() == ["MODEL", "AT", "ERROR"]


def test_cli_keys_create_list_revoke(tmp_path: Path, stub_url: str) -> None:
    settings = make_settings(tmp_path, MODELS, client_auth="keys")
    with serve_in_thread(create_app(settings, provider=FakeProvider(endpoint=stub_url))) as url:
        code, out = run(
            url, "keys", "create", "search-backend", "--team", "search", "-m", "org/*", "--rpm", "60"
        )
        assert code == 0, out
        key_id, secret = out.splitlines()[0].split()[0], out.splitlines()[1]
        assert key_id.startswith("key-") and secret.startswith("sk-gw-")
        chat = {"model": "org/chat", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200
        code, out = run(url, "keys", "list")
        assert code == 0 and secret not in out
        [line] = [line for line in out.splitlines() if line.startswith(key_id)]
        assert line.split()[1:6] == ["search-backend", "search", "active", "org/*", "True"]
        code, out = run(url, "costs", "--group-by", "team", "--since", "2000-01-01", "--until", "2999-01-01")
        assert code == 0 and out.splitlines()[0].split()[:2] == ["TEAM", "DOLLARS"] and "search" in out
        code, out = run(url, "keys", "revoke", key_id)
        assert code == 0 and json.loads(out)["state"] == "revoked"
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert run(url, "keys", "revoke", "key-000000000000")[0] == 1
