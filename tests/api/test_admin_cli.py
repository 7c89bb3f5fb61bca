"""`llm-gateway admin ...` against a real gateway served by uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.app import create_app
from gateway.cli.main import app as cli
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
