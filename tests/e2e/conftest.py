"""Start the real gateway (`llm-gateway serve`) with the local provider and the real vLLM engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from state import Store
from tasks.procs import group_members
from tests.conftest import ADMIN_TOKEN
from tests.stub_upstream import free_port

ROOT = Path(__file__).parents[2]
ENGINE = ROOT / ".venv-engine" / "bin" / "vllm"
TINY_MODEL = ROOT / "data" / "models" / "tiny-llama"
GATEWAY_BIN = Path(sys.executable).parent / "llm-gateway"

pytestmark = pytest.mark.e2e


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    db_url: str
    log: Path

    def store(self) -> Store:
        return Store(self.db_url)

    def engine_groups(self) -> list[int]:
        """Process groups of every engine the gateway recorded."""
        groups = []
        for dep in self.store().deployments(limit=1000):
            if dep.handle:
                groups.append(int(json.loads(dep.handle)["data"]["pgid"]))
        return groups

    def live_engine_groups(self) -> list[int]:
        return [g for g in self.engine_groups() if group_members(g)]

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill_everything(self) -> None:
        """Last-resort cleanup by process id: the gateway, then any engine group it recorded."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pgid in self.live_engine_groups():
            os.killpg(pgid, signal.SIGKILL)


def start_gateway(
    tmp_path: Path, models: dict[str, Any] | None = None, *, reuse: bool = False, **settings: Any
) -> GatewayProcess:
    """`models`: extra reference entries; each defaults to the tiny model's settings. `reuse`:
    start again on the settings (and so the database) an earlier call wrote in `tmp_path`."""
    if not ENGINE.exists() or not (TINY_MODEL / ".complete").exists():
        pytest.fail("the engine is not built: run `make engine`")
    config_file = tmp_path / "gateway.yaml"
    if reuse:
        config = yaml.safe_load(config_file.read_text())
        return _launch(tmp_path, config_file, config)
    port = free_port()
    data = tmp_path / "data"
    reference = tmp_path / "model_reference.json"
    shipped = json.loads((ROOT / "model_reference.json").read_text())
    shipped["tiny-llama"]["path"] = str(TINY_MODEL)
    for model_id, entry in (models or {}).items():
        shipped[model_id] = {**shipped["tiny-llama"], **entry}
    reference.write_text(json.dumps(shipped))
    config: dict[str, Any] = {
        "port": port,
        "admin_token": ADMIN_TOKEN,
        "client_auth": "open",  # the key test (test_keys_vllm.py) sets keys
        "after_hours": None,
        "data_dir": str(data),
        "model_reference": str(reference),
        "local": {
            "gpu_ids": ["0"],
            "engine_command": f"{ENGINE} serve {{model}} --served-model-name {{served_name}} "
            "--host {host} --port {port} {engine_args}",
            "env": {"HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")},
        },
    }
    local = settings.pop("local", {})  # e.g. local={"gpu_ids": ["0", "1"]}
    config["local"]["env"].update(local.pop("env", {}))
    config["local"].update(local)
    config.update(settings)
    config_file.write_text(yaml.safe_dump(config))
    return _launch(tmp_path, config_file, config)


def _launch(tmp_path: Path, config_file: Path, config: dict[str, Any]) -> GatewayProcess:
    port = config["port"]
    data = Path(config["data_dir"])
    log = tmp_path / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMGW_")}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [str(GATEWAY_BIN), "serve", "--config", str(config_file)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    db_url = config.get("database_url") or f"sqlite:///{data / 'gateway.db'}"
    gw = GatewayProcess(process, f"http://127.0.0.1:{port}", db_url, log)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited: {log.read_text()}")
        try:
            if httpx.get(f"{gw.base_url}/health", timeout=1).status_code == 200:
                return gw
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            gw.kill_everything()
            raise RuntimeError(f"gateway did not start: {log.read_text()}")
        time.sleep(0.1)


@pytest.fixture
def gateway_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    started: list[GatewayProcess] = []

    def factory(**settings: Any) -> GatewayProcess:
        gw = start_gateway(tmp_path_factory.mktemp("gw"), **settings)
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        try:
            gw.terminate(timeout=60)
        finally:
            gw.kill_everything()


def wait_until(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
