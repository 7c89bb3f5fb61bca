"""The real gateway as a subprocess (`llm-gateway serve --config <yaml>`) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.procs import HOST, Server, free_port, kill_group, start_server
from state import Store
from tasks.procs import is_our_group

GATEWAY_BIN = Path(sys.executable).parent / "llm-gateway"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"


@dataclass
class Gateway:
    server: Server
    db_url: str

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def pid(self) -> int:
        return self.server.pid

    def store(self) -> Store:
        return Store(self.db_url)

    def stop(self) -> None:
        """SIGTERM (the gateway stops its engines), then, as a last resort, SIGKILL to the
        gateway's group and to every engine group it recorded that is still ours."""
        try:
            self.server.stop(grace_seconds=60)
        finally:
            for pgid, start in self._engine_groups():
                if is_our_group(pgid, start):
                    os.killpg(pgid, signal.SIGKILL)
                    kill_group(pgid, grace_seconds=5)

    def _engine_groups(self) -> list[tuple[int, int | None]]:
        store = self.store()
        try:
            groups = []
            for dep in store.deployments(limit=10_000):
                if dep.handle:
                    data = json.loads(dep.handle).get("data", {})
                    if "pgid" in data:
                        groups.append((int(data["pgid"]), data.get("start_time")))
            return groups
        except Exception:  # no database yet: the gateway never started
            return []
        finally:
            store.close()


def start_gateway(workdir: Path, models: dict[str, Any], **settings: Any) -> Gateway:
    """Start `llm-gateway serve` with `models` as its reference file; `settings` are YAML keys."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    reference = workdir / "model_reference.json"
    reference.write_text(json.dumps(models))
    data = workdir / "data"
    config: dict[str, Any] = {
        "host": HOST,
        "port": port,
        "admin_token": ADMIN_TOKEN,
        "client_auth": "open",  # the load generators carry no API key (see bench/key_check.py)
        "after_hours": None,
        "data_dir": str(data),
        "model_reference": str(reference),
        "local": {"gpu_ids": ["0"]},
    }
    config.update(settings)
    config_file = workdir / "gateway.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMGW_")}
    server = start_server(
        "gateway",
        [str(GATEWAY_BIN), "serve", "--config", str(config_file)],
        port=port,
        log=workdir / "gateway.log",
        env=env,
    )
    return Gateway(server, f"sqlite:///{data / 'gateway.db'}")
