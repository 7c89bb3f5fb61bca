"""The LiteLLM proxy (optional, from `.venv-litellm`, see scripts/setup_litellm.sh) as a subprocess
with one worker, routing model `stub` to the benchmark's stub upstream as an OpenAI-compatible
model. No master key (like the gateway's OpenAI routes, which take no key), no database."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from bench.procs import HOST, ROOT, Server, free_port, start_server

LITELLM_BIN = ROOT / ".venv-litellm" / "bin" / "litellm"
# LiteLLM imports a lot and builds its proxy app at start: about a minute on this machine.
START_TIMEOUT_SECONDS = 240


def installed() -> bool:
    return LITELLM_BIN.exists()


def version() -> str:
    stamp = LITELLM_BIN.parent.parent / ".stamp-litellm"
    return stamp.read_text().strip() if stamp.exists() else "unknown version"


def start_litellm(workdir: Path, model: str, upstream_url: str) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": f"{upstream_url}/v1",
                    "api_key": "sk-unused",
                },
            }
        ],
        # Without a master key LiteLLM refuses to start unless told this is on purpose.
        "general_settings": {"dangerously_permit_weak_or_unset_master_key": True},
        "litellm_settings": {"telemetry": False},
    }
    config_file = workdir / "litellm.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download of the price list at start
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
    }
    argv = [
        str(LITELLM_BIN),
        "--config",
        str(config_file),
        "--host",
        HOST,
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    return start_server(
        "litellm",
        argv,
        port=port,
        log=workdir / "litellm.log",
        env=env,
        ready_path="/health/liveliness",
        timeout=START_TIMEOUT_SECONDS,
    )
