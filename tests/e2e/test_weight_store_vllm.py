"""The weight store, proven on this machine: the tiny model is pushed into an S3 bucket that moto
serves on 127.0.0.1, and a real vLLM started by the LocalProvider loads it from there with the
Run:ai streamer (`--load-format runai_streamer`), nothing from a local path, then answers chat
through its front."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config.reference import load_reference
from gateway.config.settings import DEFAULT_ENGINE_COMMAND
from tasks.local import LocalConfig, LocalProvider
from tasks.provider import LaunchSpec
from tests.e2e.conftest import ENGINE, ROOT, TINY_MODEL
from tests.stub_upstream import free_port

KEY = "5eed" * 16
BUCKET = "llmgw-weights"
MOTO_SERVER = Path(sys.executable).parent / "moto_server"


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A moto S3 on 127.0.0.1 holding the tiny model under tiny-llama/; its client settings."""
    import boto3
    import botocore.exceptions

    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    moto = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        client = boto3.client(
            "s3",
            region_name="us-east-1",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        for _ in range(100):
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except botocore.exceptions.EndpointConnectionError:
                time.sleep(0.1)  # moto still starting
        for f in TINY_MODEL.iterdir():
            if f.is_file() and not f.name.startswith("."):
                client.upload_file(str(f), BUCKET, f"tiny-llama/{f.name}")
        yield env
    finally:
        moto.send_signal(signal.SIGTERM)
        moto.wait(10)


async def test_a_real_vllm_streams_its_weights_from_the_store(
    tmp_path: Path, s3: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if not ENGINE.exists() or not (TINY_MODEL / ".complete").exists():
        pytest.fail("the engine is not built: run `make engine`")
    for name, value in s3.items():  # the gateway's own credentials, passed through by the operator
        monkeypatch.setenv(name, value)
    model = load_reference(ROOT / "model_reference.json")["tiny-llama"]
    provider = LocalProvider(
        LocalConfig(
            engine_command=DEFAULT_ENGINE_COMMAND.replace(".venv-engine/bin/vllm", str(ENGINE), 1),
            gpu_ids=("0",),
            log_dir=tmp_path / "engines",
            env={
                "HF_HUB_OFFLINE": "1",
                "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
                "HOME": str(tmp_path),
            },
            env_passthrough=("AWS_*",),
        )
    )
    spec = LaunchSpec(
        deployment_id="store1",
        model="tiny-llama",
        weights_uri=f"s3://{BUCKET}/tiny-llama",
        engine_args=model.engine_argv(),
        engine_key=KEY,
    )
    ref = await provider.launch(spec)
    try:
        endpoint = await asyncio.wait_for(provider.wait_ready(ref), 300)
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.post(
                f"{endpoint.base_url}/v1/chat/completions",
                json={
                    "model": "tiny-llama",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 4,
                },
                headers={"Authorization": f"Bearer {KEY}"},
            )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] > 0
    finally:
        await provider.stop(ref)
    log = Path(ref.data["log"]).read_text()
    assert f"s3://{BUCKET}/tiny-llama" in log and "Loading safetensors using Runai Model Streamer" in log
    assert str(TINY_MODEL) not in log  # nothing came from the local copy
