"""LocalProvider against a real stub engine process (tests/stub_upstream.py) behind its real
nginx front."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from tasks.local import LocalConfig, LocalProvider, render_command
from tasks.procs import group_members, start_time
from tasks.provider import CapacityError, ClusterRef, EngineExited, LaunchSpec, ProviderError

STUB = Path(__file__).parents[1] / "stub_upstream.py"


def provider(
    tmp_path: Path, extra: str = "", gpu_ids: tuple[str, ...] = ("0",), grace: float = 5.0
) -> LocalProvider:
    command = (
        f"{sys.executable} {STUB} --uds {{socket}} --served-name {{served_name}} {extra} {{engine_args}}"
    )
    return LocalProvider(
        LocalConfig(
            engine_command=command, gpu_ids=gpu_ids, log_dir=tmp_path / "engines", stop_grace_seconds=grace
        )
    )


KEY = "5e" * 32
AUTH = {"Authorization": f"Bearer {KEY}"}


def spec(model: str = "m", gpus: int = 1, dep: str = "d1", args: tuple[str, ...] = ()) -> LaunchSpec:
    return LaunchSpec(
        deployment_id=dep,
        model=model,
        gpus=gpus,
        engine_args=args,
        secrets={"HF_TOKEN": "hf_x"},
        engine_key=KEY,
    )


def test_render_command_fills_words_without_a_shell() -> None:
    s = LaunchSpec(deployment_id="d", model="org/m", gpus=2, model_path="/w/m", engine_args=("--a", "x y"))
    argv = render_command(
        "vllm serve {model} --served-model-name {served_name} --port {port} -tp {gpus} {engine_args} --tail",
        s,
        port=1234,
    )
    assert argv == [
        "vllm",
        "serve",
        "/w/m",
        "--served-model-name",
        "org/m",
        "--port",
        "1234",
        "-tp",
        "2",
        "--a",
        "x y",
        "--tail",
    ]
    with pytest.raises(ProviderError, match="nope"):
        render_command("x {nope}", s, port=1)


async def test_launch_ready_serve_stop_kills_whole_group(tmp_path: Path) -> None:
    p = provider(tmp_path, "--children 2")
    ref = await p.launch(spec(args=("--ready-after", "0.3")))
    assert ref.data["gpu_ids"] == ["0"]
    endpoint = await asyncio.wait_for(p.wait_ready(ref), 20)
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"{endpoint.base_url}/v1/chat/completions", json={"model": "m", "messages": []}, headers=AUTH
        )
    assert r.status_code == 200
    pgid = ref.data["pgid"]
    assert len(group_members(pgid)) == 5  # the engine, its two children, nginx's master and worker
    assert [i.status for i in await p.list()] == ["running"]
    await p.stop(ref)
    assert group_members(pgid) == []
    assert await p.list() == []
    assert p.free_slots() == ["0"]
    log = Path(ref.data["log"])
    assert log.exists() and log.parent == tmp_path / "engines"


async def test_gpu_slots_and_capacity(tmp_path: Path) -> None:
    p = provider(tmp_path, gpu_ids=("0", "1", "2"))
    with pytest.raises(ProviderError, match="pool has 3"):
        await p.launch(spec(gpus=4))
    a = await p.launch(spec("a", gpus=2, dep="a"))
    try:
        assert a.data["gpu_ids"] == ["0", "1"]
        with pytest.raises(CapacityError) as info:
            await p.launch(spec("b", gpus=2, dep="b"))
        assert "1 of 3 are free" in str(info.value) and info.value.tried == ("local",)
        await asyncio.wait_for(p.wait_ready(a), 20)  # exec'd: /proc shows the engine's own environment
        env = Path(f"/proc/{a.data['pid']}/environ").read_bytes().split(b"\0")
        assert b"CUDA_VISIBLE_DEVICES=0,1" in env and b"HF_TOKEN=hf_x" in env
    finally:
        await p.stop(a)


async def test_engine_exit_before_ready_keeps_its_log_apart_from_the_message(tmp_path: Path) -> None:
    p = provider(tmp_path, "--exit-after 0.2")
    ref = await p.launch(spec())
    with pytest.raises(EngineExited) as info:
        await asyncio.wait_for(p.wait_ready(ref), 20)
    message = str(info.value)
    assert message == "the engine for m (deployment d1) exited with code 3 before it was ready"
    assert "stub: exiting with code 3 as asked" in info.value.log_tail
    await p.stop(ref)  # the front is still up: stop() ends the whole group
    assert group_members(ref.data["pgid"]) == []
    assert p.free_slots() == ["0"]


async def test_sigterm_ignored_means_sigkill_after_grace(tmp_path: Path) -> None:
    p = provider(tmp_path, "--ignore-term --children 1", grace=0.5)
    ref = await p.launch(spec())
    await asyncio.wait_for(p.wait_ready(ref), 20)
    await asyncio.wait_for(p.stop(ref), 10)
    assert group_members(ref.data["pgid"]) == []


async def test_a_new_provider_stops_an_engine_it_did_not_start(tmp_path: Path) -> None:
    first = provider(tmp_path, "--children 1")
    ref = await first.launch(spec())
    await asyncio.wait_for(first.wait_ready(ref), 20)
    # As after a gateway crash: only the stored handle is left.
    stored = ClusterRef(provider="local", name=ref.name, deployment_id=ref.deployment_id, data=dict(ref.data))
    second = provider(tmp_path)
    await second.stop(stored)
    assert group_members(ref.data["pgid"]) == []
    await first.stop(ref)  # idempotent


async def test_a_recycled_pid_is_never_killed(tmp_path: Path) -> None:
    p = provider(tmp_path)
    ref = await p.launch(spec())
    try:
        await asyncio.wait_for(p.wait_ready(ref), 20)
        pid = ref.data["pid"]
        assert start_time(pid) == ref.data["start_time"]
        other = ClusterRef(
            provider="local",
            name="x",
            deployment_id="other",
            data={**ref.data, "start_time": ref.data["start_time"] - 1},
        )
        await provider(tmp_path).stop(other)  # same pgid, different start time: not ours
        assert group_members(ref.data["pgid"]) != []
    finally:
        await p.stop(ref)


async def _environment_of_engine(tmp_path: Path, **config: object) -> dict[str, str]:
    """Start a real engine command that prints its environment, and read it back from its log."""
    p = LocalProvider(
        LocalConfig(
            engine_command="/bin/sh -c 'env; exec sleep 60'",
            gpu_ids=("0",),
            log_dir=tmp_path / "engines",
            **config,  # type: ignore[arg-type]
        )
    )
    ref = await p.launch(spec())
    try:
        log = Path(ref.data["log"])  # the launcher shell execs the command: it is the engine
        for _ in range(100):
            if "PATH=" in log.read_text():
                break
            await asyncio.sleep(0.05)
        lines = log.read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)
    finally:
        await p.stop(ref)


async def test_engines_get_an_allowlisted_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMGW_ADMIN_TOKEN", "admin-secret")
    monkeypatch.setenv("LLMGW_HF_TOKEN", "hf_gateway")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/etc/gcp.json")
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_shell")
    monkeypatch.setenv("HF_HOME", "/models/hf")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    env = await _environment_of_engine(tmp_path, env={"VLLM_LOGGING_LEVEL": "DEBUG"})
    leaked = {"LLMGW_ADMIN_TOKEN", "LLMGW_HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
    assert not leaked & set(env) and "GOOGLE_APPLICATION_CREDENTIALS" not in env
    assert "admin-secret" not in str(env) and "aws-secret" not in str(env)
    assert env["HF_TOKEN"] == "hf_x"  # the model's secret, not the shell's token
    assert env["HF_HOME"] == "/models/hf" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["LC_ALL"] == "C.UTF-8" and env["PATH"] == os.environ["PATH"]
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG" and env["CUDA_VISIBLE_DEVICES"] == "0"
    assert env["TMPDIR"].startswith(tempfile.gettempdir())


async def test_the_operator_can_pass_credentials_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("LLMGW_ADMIN_TOKEN", "admin-secret")
    env = await _environment_of_engine(tmp_path, env_passthrough=("AWS_*",))
    assert env["AWS_SECRET_ACCESS_KEY"] == "aws-secret" and env["AWS_REGION"] == "us-east-1"
    assert "LLMGW_ADMIN_TOKEN" not in env


async def test_the_front_passes_only_the_gateways_routes_and_only_with_the_key(tmp_path: Path) -> None:
    p = provider(tmp_path, "--chunk-delay 0.3")
    ref = await p.launch(spec())
    try:
        base = (await asyncio.wait_for(p.wait_ready(ref), 20)).base_url
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{base}/health")).status_code == 200  # probes need no key
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                    r = await client.request(method, f"{base}{path}", json=chat, headers=headers)
                    assert r.status_code == 401, (path, headers)
                    assert r.json()["error"]["type"] == "authentication_error"
            # Routes vLLM serves but the gateway does not use: closed, key or not.
            for path in ["/invocations", "/pause", "/metrics", "/update_weights", "/v1/models/../../pause"]:
                for headers in ({}, AUTH):
                    r = await client.post(f"{base}{path}", json=chat, headers=headers)
                    assert r.status_code in (403, 404), (path, r.status_code)
            assert (await client.get(f"{base}/v1/chat/completions", headers=AUTH)).status_code == 403
            r = await client.get(f"{base}/v1/models", headers=AUTH)
            assert [m["id"] for m in r.json()["data"]] == ["m"]
            # A stream passes through as it comes, not buffered to the end.
            arrivals = []
            async with client.stream(
                "POST", f"{base}/v1/chat/completions", json={**chat, "stream": True}, headers=AUTH
            ) as stream:
                async for _ in stream.aiter_raw():
                    arrivals.append(asyncio.get_running_loop().time())
            assert len(arrivals) >= 3 and arrivals[-1] - arrivals[0] >= 0.5
    finally:
        await p.stop(ref)


async def test_the_front_carries_as_many_open_requests_as_the_gateway_sends(tmp_path: Path) -> None:
    """The gateway opens up to 1,000 connections to one engine (a herd of cold requests all at
    once); each is two of the front's connections. With nginx's default 1024 per worker, the
    front closed about 40% of them (the herd benchmark's 502s)."""
    p = provider(tmp_path, "--chunk-delay 0.5")
    ref = await p.launch(spec())
    try:
        base = (await asyncio.wait_for(p.wait_ready(ref), 20)).base_url
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:

            async def one() -> int:
                r = await client.post(f"{base}/v1/chat/completions", json=chat, headers=AUTH)
                return r.status_code

            statuses = await asyncio.gather(*(one() for _ in range(700)), return_exceptions=True)
        assert statuses == [200] * 700
    finally:
        await p.stop(ref)


async def test_the_engine_listens_on_a_socket_only_its_user_can_open(tmp_path: Path) -> None:
    p = provider(tmp_path)
    ref = await p.launch(spec())
    try:
        await asyncio.wait_for(p.wait_ready(ref), 20)
        private = Path(ref.data["tmp_dir"])
        assert private.stat().st_mode & 0o777 == 0o700
        assert (private / "engine.sock").is_socket()
        assert (private / "nginx.conf").stat().st_mode & 0o777 == 0o600
        assert KEY in (private / "nginx.conf").read_text()
        assert KEY not in Path(ref.data["log"]).read_text() and KEY not in repr(ref)
    finally:
        await p.stop(ref)
    assert not private.exists()


async def test_no_engine_is_started_without_a_key(tmp_path: Path) -> None:
    p = provider(tmp_path)
    with pytest.raises(ProviderError, match="no engine key"):
        await p.launch(LaunchSpec(deployment_id="d1", model="m"))
    assert p.free_slots() == ["0"] and await p.list() == []


async def test_ready_only_once_the_engine_names_the_model(tmp_path: Path) -> None:
    """/health alone is not enough: after a swap the old engine may still answer it."""
    p = provider(tmp_path, "--served-name someone-else")  # the last --served-name wins
    ref = await p.launch(spec())
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                if (await client.get(f"http://127.0.0.1:{ref.data['port']}/health")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(p.wait_ready(ref), 1.5)
    finally:
        await p.stop(ref)


async def test_concurrent_launches_never_share_a_gpu(tmp_path: Path) -> None:
    p = provider(tmp_path, gpu_ids=("0", "1"))
    results = await asyncio.gather(
        *(p.launch(spec(f"m{i}", dep=f"d{i}")) for i in range(3)), return_exceptions=True
    )
    started = [r for r in results if isinstance(r, ClusterRef)]
    try:
        assert sorted(r.data["gpu_ids"][0] for r in started) == ["0", "1"]
        [refused] = [r for r in results if not isinstance(r, ClusterRef)]
        assert isinstance(refused, CapacityError)
    finally:
        for ref in started:
            await p.stop(ref)


async def test_a_swap_holds_the_victims_gpus_while_the_victim_stops(tmp_path: Path) -> None:
    p = provider(tmp_path, "--ignore-term", grace=1.0)
    victim = await p.launch(spec("low", dep="v"))
    await asyncio.wait_for(p.wait_ready(victim), 20)
    swap = asyncio.create_task(p.swap(victim, spec("high", dep="r")))
    await asyncio.sleep(0.2)  # the victim ignores SIGTERM: the swap waits for its grace period
    assert not swap.done()
    with pytest.raises(CapacityError):
        await p.launch(spec("other", dep="o"))
    new = await swap
    try:
        assert new.data["gpu_ids"] == ["0"] and group_members(victim.data["pgid"]) == []
        await asyncio.wait_for(p.wait_ready(new), 20)
    finally:
        await p.stop(new)


async def test_a_stop_cut_short_keeps_the_engine_and_its_gpus(tmp_path: Path) -> None:
    p = provider(tmp_path, "--ignore-term --children 1", grace=30.0)
    ref = await p.launch(spec())
    await asyncio.wait_for(p.wait_ready(ref), 20)
    stopping = asyncio.create_task(p.stop(ref))
    await asyncio.sleep(0.3)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert group_members(ref.data["pgid"]) != []
    assert [i.status for i in await p.list()] == ["stopping"]  # still known: shutdown stops it again
    assert p.free_slots() == []
    with pytest.raises(CapacityError):
        await p.launch(spec("b", dep="b"))
    p.config = dataclasses.replace(p.config, stop_grace_seconds=0.3)
    await asyncio.wait_for(p.stop(ref), 10)
    assert group_members(ref.data["pgid"]) == [] and p.free_slots() == ["0"] and await p.list() == []


async def test_a_later_gateway_finds_and_stops_engines_an_earlier_one_lost(tmp_path: Path) -> None:
    """Defect 17: the store may not know an engine (a crash, a FAILED row): its marker does."""
    first = provider(tmp_path, "--children 1")
    ref = await first.launch(dataclasses.replace(spec(), instance_id="inst-a"))
    await asyncio.wait_for(first.wait_ready(ref), 20)
    second = provider(tmp_path)  # a new gateway process: nothing in memory
    assert await second.list() == []
    assert await second.list("inst-b") == []  # another installation's engines are not ours
    [orphan] = await second.list("inst-a")
    assert orphan.ref.deployment_id == "d1" and orphan.ref.data["pgid"] == ref.data["pgid"]
    await second.stop(orphan.ref)
    assert group_members(ref.data["pgid"]) == [] and await second.list("inst-a") == []
    await first.stop(ref)
