"""A real vLLM started by the LocalProvider is private: its API server listens on no TCP port (a
Unix socket in a 0700 directory), and its nginx front refuses every route but /health to a
caller without the engine key, while chat with the key works."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path

import httpx
import pytest

from gateway.config.reference import load_reference
from gateway.config.settings import DEFAULT_ENGINE_COMMAND
from tasks.local import LocalConfig, LocalProvider
from tasks.procs import group_members
from tasks.provider import LaunchSpec
from tests.e2e.conftest import ENGINE, ROOT, TINY_MODEL

KEY = "c0ffee" * 10 + "abcd"
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
# Routes a vLLM server answers (some of them even with --api-key set) that the gateway never uses.
CLOSED = [
    ("POST", "/invocations"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("GET", "/metrics"),
    ("POST", "/tokenize"),
    ("GET", "/version"),
    ("GET", "/docs"),
    ("POST", "/v1/responses"),
]


def listening_tcp(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets process `pid` listens on (from /proc: its fds' inodes)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].rsplit(":", 1)
                ports.add((_address(address), int(port, 16)))
    return ports


def _address(hex_address: str) -> str:
    """/proc/net/tcp{,6} addresses: little-endian 32-bit words in hex."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


@pytest.fixture
async def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    if not ENGINE.exists() or not (TINY_MODEL / ".complete").exists():
        pytest.fail("the engine is not built: run `make engine`")
    model = load_reference(ROOT / "model_reference.json")["tiny-llama"]
    provider = LocalProvider(
        LocalConfig(
            engine_command=DEFAULT_ENGINE_COMMAND.replace(".venv-engine/bin/vllm", str(ENGINE), 1),
            gpu_ids=("0",),
            log_dir=tmp_path / "engines",
            env={"HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")},
        )
    )
    spec = LaunchSpec(
        deployment_id="priv1",
        model="tiny-llama",
        model_path=str(TINY_MODEL),
        engine_args=model.engine_argv(),
        engine_key=KEY,
    )
    ref = await provider.launch(spec)
    try:
        endpoint = await asyncio.wait_for(provider.wait_ready(ref), 300)
        yield ref, endpoint.base_url
    finally:
        await provider.stop(ref)
        assert group_members(ref.data["pgid"]) == []


async def test_a_real_vllm_answers_only_its_gateway(engine) -> None:  # type: ignore[no-untyped-def]
    ref, base = engine
    listening = {pid: listening_tcp(pid) for pid in group_members(ref.data["pgid"])}
    # vLLM's API server (the group's leader) listens on its Unix socket only; its workers' own
    # torch.distributed ports are on loopback; the one port for callers is the front's.
    assert listening[ref.data["pid"]] == set(), listening
    assert {a for ports in listening.values() for a, _ in ports} <= {"127.0.0.1"}, listening
    fronts = {pid for pid in listening if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"nginx")}
    assert {p for pid in fronts for _, p in listening[pid]} == {ref.data["port"]}, listening
    async with httpx.AsyncClient(timeout=60) as client:
        assert (await client.get(f"{base}/health")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer not-the-key"}):
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), *CLOSED]:
                r = await client.request(method, f"{base}{path}", json=CHAT, headers=headers)
                assert r.status_code in (401, 403), (method, path, r.status_code, r.text[:200])
        auth = {"Authorization": f"Bearer {KEY}"}
        for method, path in CLOSED:  # the key opens none of them
            r = await client.request(method, f"{base}{path}", json=CHAT, headers=auth)
            assert r.status_code == 403, (method, path, r.status_code)
        r = await client.post(f"{base}/v1/chat/completions", json=CHAT, headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tiny-llama" and body["usage"]["completion_tokens"] > 0
        models = (await client.get(f"{base}/v1/models", headers=auth)).json()
        assert [m["id"] for m in models["data"]] == ["tiny-llama"]
    assert KEY not in Path(ref.data["log"]).read_text()
    assert KEY not in json.dumps(dict(ref.data))
