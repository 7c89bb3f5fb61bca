"""LocalProvider: engines as subprocesses on this machine, one process group each.

The engine command is a template (see `render_command`); each engine gets a free port on
127.0.0.1, `CUDA_VISIBLE_DEVICES` from a pool of GPU ids, a log file, and its own session so
that stopping it stops every process it spawned (vLLM starts several).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.engine_env import engine_environment
from tasks.health import is_healthy, wait_healthy
from tasks.procs import group_members, is_our_group, signal_group, start_time
from tasks.provider import (
    CapacityError,
    ClusterInfo,
    ClusterRef,
    Endpoint,
    EngineExited,
    LaunchSpec,
    ProviderError,
)

log = logging.getLogger(__name__)

ENGINE_HOST = "127.0.0.1"
# How often stop() looks whether the process group is gone.
STOP_POLL_SECONDS = 0.1
# Lines of the engine log quoted in the error when an engine exits during start-up.
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class LocalConfig:
    engine_command: str
    gpu_ids: tuple[str, ...]
    log_dir: Path
    stop_grace_seconds: float = 10.0
    env: Mapping[str, str] = field(default_factory=dict)
    # Names or patterns (fnmatch) of the gateway's environment the engines get beyond the
    # allowlist of tasks.engine_env, e.g. AWS_* for a weight store in S3.
    env_passthrough: tuple[str, ...] = ()


def slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", model).strip("-").lower() or "model"


def render_command(template: str, spec: LaunchSpec, *, port: int) -> list[str]:
    """Split the template like a shell would, then fill each word. The word `{engine_args}`
    expands to the model's extra engine flags; no shell ever sees the result."""
    values = {
        "model": spec.model_path or spec.model,
        "served_name": spec.model,
        "port": str(port),
        "host": ENGINE_HOST,
        "gpus": str(spec.gpus),
        "max_model_len": str(spec.max_model_len or ""),
    }
    argv: list[str] = []
    for word in shlex.split(template):
        if word == "{engine_args}":
            argv.extend(spec.engine_args)
        else:
            try:
                argv.append(word.format(**values))
            except (KeyError, IndexError, ValueError) as exc:
                raise ProviderError(f"bad engine_command template word {word!r}: {exc}") from exc
    return argv


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((ENGINE_HOST, 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


@dataclass
class _Engine:
    ref: ClusterRef
    slots: tuple[str, ...]
    process: asyncio.subprocess.Process | None  # None for engines found after a restart


class LocalProvider:
    name = "local"
    # Engines left by a crashed gateway are stopped, not adopted: their GPU slots would have
    # to be rebuilt from the store, and a fresh start is cheap locally.
    adopt_on_restart = False
    heartbeat_interval_seconds: float | None = None  # processes have no failsafe timer

    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self._engines: dict[str, _Engine] = {}  # by deployment id

    # -- GPU slots --------------------------------------------------------------------------

    def free_slots(self) -> list[str]:
        used = {slot for engine in self._engines.values() for slot in engine.slots}
        return [gpu for gpu in self.config.gpu_ids if gpu not in used]

    def _reserve(self, spec: LaunchSpec) -> tuple[str, ...]:
        pool = self.config.gpu_ids
        if spec.gpus > len(pool):
            raise ProviderError(f"{spec.model} needs {spec.gpus} GPUs; the local pool has {len(pool)}")
        free = self.free_slots()
        if spec.gpus > len(free):
            raise CapacityError(
                f"{spec.model} needs {spec.gpus} GPUs; {len(free)} of {len(pool)} are free",
                tried=("local",),
            )
        return tuple(free[: spec.gpus])

    # -- Provider protocol ------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> ClusterRef:
        return await self._start(spec, self._reserve(spec))

    async def swap(self, ref: ClusterRef, spec: LaunchSpec) -> ClusterRef:
        engine = self._engines.get(ref.deployment_id)
        slots = engine.slots if engine else tuple(ref.data.get("gpu_ids", ()))
        if len(slots) < spec.gpus:
            raise CapacityError(f"{ref.name} has {len(slots)} GPUs; {spec.model} needs {spec.gpus}")
        await self.stop(ref)
        return await self._start(spec, slots[: spec.gpus])

    async def wait_ready(self, ref: ClusterRef) -> Endpoint:
        base_url = f"http://{ENGINE_HOST}:{ref.data['port']}"
        engine = self._engines.get(ref.deployment_id)
        log_path = Path(str(ref.data.get("log", "")))

        def alive() -> None:
            proc = engine.process if engine else None
            exited = proc.returncode is not None if proc else not is_our_group(*_group_of(ref))
            if exited:
                code = proc.returncode if proc else "?"
                raise EngineExited(
                    f"engine for {ref.data.get('model')} exited (code {code}) before it was ready; "
                    f"last lines of {log_path.name}:\n{_log_tail(log_path)}"
                )

        await wait_healthy(base_url, alive=alive)
        return Endpoint(base_url=base_url)

    async def probe(self, ref: ClusterRef) -> Endpoint | None:
        if not is_our_group(*_group_of(ref)):
            return None
        base_url = f"http://{ENGINE_HOST}:{ref.data['port']}"
        return Endpoint(base_url=base_url) if await is_healthy(base_url) else None

    async def heartbeat(self, ref: ClusterRef) -> None:
        return None

    async def stop(self, ref: ClusterRef) -> None:
        """SIGTERM to the engine's process group, SIGKILL after the grace period; returns when
        no process of the group is left. Safe on engines of an earlier gateway process."""
        engine = self._engines.get(ref.deployment_id)
        pgid, leader_start = _group_of(ref)
        try:
            if not is_our_group(pgid, leader_start):
                return
            signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + self.config.stop_grace_seconds
            while group_members(pgid) and time.monotonic() < deadline:
                await self._reap(engine)
                await asyncio.sleep(STOP_POLL_SECONDS)
            if group_members(pgid):
                log.warning(
                    "engine %s ignored SIGTERM for %.0fs: SIGKILL", ref.name, self.config.stop_grace_seconds
                )
                signal_group(pgid, signal.SIGKILL)
                # No event tells when a process group empties (its members are not our children):
                # poll /proc.
                while group_members(pgid):  # noqa: ASYNC110
                    await asyncio.sleep(STOP_POLL_SECONDS)
            await self._reap(engine)
        finally:
            self._engines.pop(ref.deployment_id, None)
            if not group_members(pgid) and ref.data.get("tmp_dir"):
                shutil.rmtree(str(ref.data["tmp_dir"]), ignore_errors=True)

    async def list(self) -> list[ClusterInfo]:
        infos = []
        for engine in self._engines.values():
            proc = engine.process
            running = proc.returncode is None if proc else is_our_group(*_group_of(engine.ref))
            infos.append(
                ClusterInfo(
                    ref=engine.ref,
                    status="running" if running else "exited",
                    model=engine.ref.data.get("model"),
                )
            )
        return infos

    # -- internals --------------------------------------------------------------------------

    async def _start(self, spec: LaunchSpec, slots: Sequence[str]) -> ClusterRef:
        port = free_port()
        argv = render_command(self.config.engine_command, spec, port=port)
        name = f"{slug(spec.model)}-{spec.deployment_id}"
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.config.log_dir / f"{name}.log"
        # A private, short TMPDIR: vLLM puts its IPC sockets there and their paths must stay
        # under 108 bytes, so it cannot live below a deep data directory.
        tmp_dir = tempfile.mkdtemp(prefix=f"llmgw-{spec.deployment_id}-")
        env = engine_environment(
            os.environ,
            passthrough=self.config.env_passthrough,
            defaults={"TMPDIR": tmp_dir},
            configured=self.config.env,
            forced={"CUDA_VISIBLE_DEVICES": ",".join(slots)},
            secrets=spec.secrets,
        )
        log.info(
            "starting engine %s for %s on GPUs [%s]: %s", name, spec.model, ",".join(slots), shlex.join(argv)
        )
        with log_path.open("ab") as log_file:
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # its own process group: stop() signals all of it
                )
            except OSError as exc:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                raise ProviderError(f"cannot start the engine for {spec.model}: {exc}") from exc
        data: dict[str, Any] = {
            "model": spec.model,
            "pid": process.pid,
            "pgid": process.pid,
            "start_time": start_time(process.pid),
            "port": port,
            "gpu_ids": list(slots),
            "log": str(log_path),
            "tmp_dir": tmp_dir,
        }
        ref = ClusterRef(
            provider=self.name, name=name, deployment_id=spec.deployment_id, gpus=len(slots), data=data
        )
        self._engines[spec.deployment_id] = _Engine(ref=ref, slots=tuple(slots), process=process)
        return ref

    @staticmethod
    async def _reap(engine: _Engine | None) -> None:
        proc = engine.process if engine else None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=STOP_POLL_SECONDS)


def _group_of(ref: ClusterRef) -> tuple[int, int | None]:
    start = ref.data.get("start_time")
    return int(ref.data["pgid"]), int(start) if start is not None else None
