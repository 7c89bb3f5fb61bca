"""LocalProvider: engines as subprocesses on this machine, one process group each.

The engine command is a template (see `render_command`). Each engine gets a private 0700
directory (its TMPDIR, where vLLM listens on a Unix socket with `--uds {socket}`), an
authenticating nginx front on a free 127.0.0.1 port (tasks/front.py) in the engine's own
process group, `CUDA_VISIBLE_DEVICES` from a pool of GPU ids, an allowlisted environment
(tasks/engine_env.py) and a log file. Stopping the group stops the engine, every process it
spawned (vLLM starts several) and the front.

GPU slots are taken synchronously, before any await, so two launches (or a launch and a swap)
never get the same GPU; they are given back only once the engine's process group is gone, so
a stop that was cut short keeps them (and `list()` shows the engine as `stopping`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks import front
from tasks.engine_env import engine_environment
from tasks.health import is_healthy, wait_healthy
from tasks.procs import group_members, is_our_group, marked_leaders, signal_group, start_time
from tasks.provider import (
    CapacityError,
    ClusterInfo,
    ClusterRef,
    Endpoint,
    EngineExited,
    LaunchSpec,
    LoadingState,
    ProviderError,
    engine_args,
    weights,
)

log = logging.getLogger(__name__)

ENGINE_HOST = "127.0.0.1"
# How often stop() looks whether the process group is gone.
STOP_POLL_SECONDS = 0.1
# Lines of the engine log kept for admins when an engine exits during start-up.
LOG_TAIL_LINES = 20
SOCKET_NAME = "engine.sock"
# In every engine's environment: `<instance id>/<deployment id>`, so that a later gateway process
# finds the engines an earlier one lost track of (it crashed, or its store row is terminal).
MARKER = "LLMGW_ENGINE_OF"


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


def render_command(
    template: str, spec: LaunchSpec, *, port: int, socket_path: str | None = None
) -> list[str]:
    """Split the template like a shell would, then fill each word. The word `{engine_args}`
    expands to the model's extra engine flags; no shell ever sees the result. `{socket}` is
    the Unix socket the engine should listen on; `{host}`/`{port}` a private TCP address."""
    values = {
        "model": weights(spec),
        "served_name": spec.model,
        "port": str(port),
        "host": ENGINE_HOST,
        "gpus": str(spec.gpus),
        "max_model_len": str(spec.max_model_len or ""),
    }
    if socket_path is not None:
        values["socket"] = socket_path
    argv: list[str] = []
    for word in shlex.split(template):
        if word == "{engine_args}":
            argv.extend(engine_args(spec))
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
    """One deployment's slots, from reservation until its process group is gone."""

    slots: tuple[str, ...]
    ref: ClusterRef | None = None  # None while it starts
    process: subprocess.Popen[bytes] | None = None  # None for engines found after a restart
    stopping: bool = False

    def gone(self) -> bool:
        return self.ref is not None and not is_our_group(*_group_of(self.ref))


class LocalProvider:
    name = "local"
    # Engines left by an earlier gateway process (a crash, or the lease holder of a fleet that
    # died) are adopted when healthy: their GPU slots are taken back from their handle when a
    # probe finds them alive (`_claim`), so no second engine of the model is started.
    adopt_on_restart = True
    # No spares: a slot kept with its engine unused blocks launches, and a swap onto it is a stop
    # and a start, which is all a local cold start is.
    keeps_spares = False
    heartbeat_interval_seconds: float | None = None  # processes have no failsafe timer

    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self._engines: dict[str, _Engine] = {}  # by deployment id
        self._nginx: tuple[str, frozenset[str]] | None = None

    # -- GPU slots --------------------------------------------------------------------------

    def free_slots(self) -> list[str]:
        for dep_id, engine in list(self._engines.items()):
            if engine.stopping and engine.gone():  # a stop that was cut short, finished since
                self._forget(dep_id, engine)
        used = {slot for engine in self._engines.values() for slot in engine.slots}
        return [gpu for gpu in self.config.gpu_ids if gpu not in used]

    def _reserve(self, spec: LaunchSpec, slots: tuple[str, ...] | None = None) -> _Engine:
        """Synchronous: the slots are the deployment's from here on."""
        if spec.deployment_id in self._engines:
            raise ProviderError(f"deployment {spec.deployment_id} already has an engine")
        if slots is None:
            pool = self.config.gpu_ids
            if spec.gpus > len(pool):
                raise ProviderError(f"{spec.model} needs {spec.gpus} GPUs; the local pool has {len(pool)}")
            free = self.free_slots()
            if spec.gpus > len(free):
                raise CapacityError(
                    f"{spec.model} needs {spec.gpus} GPUs; {len(free)} of {len(pool)} are free",
                    tried=("local",),
                )
            slots = tuple(free[: spec.gpus])
        engine = _Engine(slots=slots)
        self._engines[spec.deployment_id] = engine
        return engine

    # -- Provider protocol ------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> ClusterRef:
        _require_key(spec)
        engine = self._reserve(spec)
        return await self._start(spec, engine)

    def fits(self, ref: ClusterRef, spec: LaunchSpec) -> bool:
        engine = self._engines.get(ref.deployment_id)
        slots = engine.slots if engine else tuple(ref.data.get("gpu_ids", ()))
        return len(slots) >= spec.gpus

    async def swap(self, ref: ClusterRef, spec: LaunchSpec) -> ClusterRef:
        """Stop `ref`'s engine and start `spec`'s on its GPUs. The requester holds those GPUs
        from the first line on, so no launch can take them while the old engine stops."""
        _require_key(spec)
        victim = self._engines.get(ref.deployment_id)
        slots = victim.slots if victim else tuple(ref.data.get("gpu_ids", ()))
        if len(slots) < spec.gpus:
            raise CapacityError(f"{ref.name} has {len(slots)} GPUs; {spec.model} needs {spec.gpus}")
        engine = self._reserve(spec, tuple(slots[: spec.gpus]))
        try:
            await self.stop(ref)
        except BaseException:
            self._engines.pop(spec.deployment_id, None)  # the victim's entry still holds the GPUs
            raise
        return await self._start(spec, engine)

    async def wait_ready(self, ref: ClusterRef) -> Endpoint:
        if not ref.engine_key:
            raise ProviderError(f"deployment {ref.deployment_id}: no engine key to check the engine with")
        base_url = f"http://{ENGINE_HOST}:{ref.data['port']}"
        engine = self._engines.get(ref.deployment_id)
        await wait_healthy(
            base_url,
            model=str(ref.data["model"]),
            key=ref.engine_key,
            alive=lambda: _check_alive(ref, engine),
        )
        return Endpoint(base_url=base_url)

    async def probe(self, ref: ClusterRef) -> Endpoint | None:
        if not is_our_group(*_group_of(ref)) or "port" not in ref.data:
            return None
        base_url = f"http://{ENGINE_HOST}:{ref.data['port']}"
        if not await is_healthy(base_url):
            return None
        self._claim(ref)
        return Endpoint(base_url=base_url)

    async def probe_loading(self, ref: ClusterRef) -> LoadingState:
        if not is_our_group(*_group_of(ref)) or "port" not in ref.data:
            return "dead"
        if await self.probe(ref) is not None:
            return "ready"
        self._claim(ref)
        return "loading"

    def _claim(self, ref: ClusterRef) -> None:
        """An engine of an earlier gateway process found alive: its GPU slots (from its handle)
        are held from now on, as if this process had started it (until it is stopped)."""
        if ref.deployment_id not in self._engines:
            slots = tuple(str(s) for s in ref.data.get("gpu_ids", ()))
            self._engines[ref.deployment_id] = _Engine(slots=slots, ref=ref)
            log.info(
                "engine %s of an earlier gateway process taken back (GPUs [%s])", ref.name, ",".join(slots)
            )

    async def check_failsafe(self, instance_id: str | None = None) -> list[str]:
        return []  # processes have no failsafe timer: a gateway restart stops what it finds

    async def close(self) -> None:
        return None

    async def heartbeat(self, ref: ClusterRef) -> None:
        return None

    async def stop(self, ref: ClusterRef) -> None:
        """SIGTERM to the engine's process group (its front included), SIGKILL after the grace
        period; returns when no process of the group is left. Safe on engines of an earlier
        gateway process. Cut short, it leaves the engine `stopping` with its GPUs held."""
        engine = self._engines.get(ref.deployment_id)
        if engine is not None and engine.ref is not None and engine.ref.name == ref.name:
            engine.stopping = True
        else:
            engine = None  # the entry (if any) is another engine's (the requester of a swap)
        pgid, leader_start = _group_of(ref)
        if is_our_group(pgid, leader_start):
            signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + self.config.stop_grace_seconds
            while group_members(pgid) and time.monotonic() < deadline:
                self._reap(engine)
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
            self._reap(engine)
        if engine is not None:
            self._forget(ref.deployment_id, engine)
        elif ref.data.get("tmp_dir"):
            shutil.rmtree(str(ref.data["tmp_dir"]), ignore_errors=True)

    async def list(self, instance_id: str | None = None) -> list[ClusterInfo]:
        """This process's engines, and with `instance_id` also the engines of this installation
        that an earlier gateway process left running (found by their marker)."""
        infos = []
        for engine in self._engines.values():
            if engine.ref is None:
                continue
            status = "stopping" if engine.stopping else "exited" if engine.gone() else "running"
            infos.append(ClusterInfo(ref=engine.ref, status=status, model=engine.ref.data.get("model")))
        if instance_id:
            known = {int(info.ref.data["pgid"]) for info in infos}
            for pid, marker in marked_leaders(MARKER).items():
                owner, _, deployment_id = marker.partition("/")
                if owner == instance_id and pid not in known:
                    infos.append(ClusterInfo(ref=_orphan_ref(pid, deployment_id), status="running"))
        return infos

    # -- internals --------------------------------------------------------------------------

    def _forget(self, deployment_id: str, engine: _Engine) -> None:
        if self._engines.get(deployment_id) is engine:
            del self._engines[deployment_id]
        if engine.ref is not None and engine.ref.data.get("tmp_dir"):
            shutil.rmtree(str(engine.ref.data["tmp_dir"]), ignore_errors=True)

    async def _start(self, spec: LaunchSpec, engine: _Engine) -> ClusterRef:
        """Start the engine and its front. Synchronous (no await between spawning the process
        group and recording it), so a cancelled launch cannot lose track of a process."""
        try:
            return self._spawn(spec, engine, *self._find_nginx())
        except BaseException:
            self._engines.pop(spec.deployment_id, None)
            raise

    def _find_nginx(self) -> tuple[str, frozenset[str]]:
        if self._nginx is None:
            nginx = front.find_nginx()
            if nginx is None:
                raise ProviderError("local engines need nginx for their front (apt-get install nginx)")
            self._nginx = (nginx, front.missing_modules(nginx))
        return self._nginx

    def _spawn(self, spec: LaunchSpec, engine: _Engine, nginx: str, missing: frozenset[str]) -> ClusterRef:
        name = f"{slug(spec.model)}-{spec.deployment_id}"
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.config.log_dir / f"{name}.log"
        # Private (0700) and short: the engine's socket, the front's config (it holds the key),
        # vLLM's IPC sockets (a socket path must stay under 108 bytes).
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"llmgw-{spec.deployment_id}-"))
        try:
            engine_port, front_port = free_port(), free_port()
            socket_path = str(tmp_dir / SOCKET_NAME)
            argv = render_command(self.config.engine_command, spec, port=engine_port, socket_path=socket_path)
            upstream = (
                f"unix:{socket_path}"
                if "{socket}" in self.config.engine_command
                else (f"{ENGINE_HOST}:{engine_port}")
            )
            listen = f"{ENGINE_HOST}:{front_port}"
            config = front.FrontConfig(listen, upstream, str(tmp_dir), _worker_user(), missing)
            conf = tmp_dir / "nginx.conf"
            conf.touch(mode=0o600)
            conf.write_text(front.nginx_config(config, key=spec.engine_key))
            log.info(
                "starting engine %s for %s on GPUs [%s] behind %s: %s",
                name,
                spec.model,
                ",".join(engine.slots),
                listen,
                shlex.join(argv),
            )
            process = self._popen(front.launcher(nginx, tmp_dir, argv), log_path, tmp_dir, spec, engine)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        engine.process = process
        engine.ref = ClusterRef(
            provider=self.name,
            name=name,
            deployment_id=spec.deployment_id,
            gpus=len(engine.slots),
            data={
                "model": spec.model,
                "pid": process.pid,
                "pgid": process.pid,
                "start_time": start_time(process.pid),
                "port": front_port,
                "gpu_ids": list(engine.slots),
                "log": str(log_path),
                "tmp_dir": str(tmp_dir),
            },
            engine_key=spec.engine_key,
        )
        return engine.ref

    def _popen(
        self, argv: Sequence[str], log_path: Path, tmp_dir: Path, spec: LaunchSpec, engine: _Engine
    ) -> subprocess.Popen[bytes]:
        env = engine_environment(
            os.environ,
            passthrough=self.config.env_passthrough,
            defaults={"TMPDIR": str(tmp_dir)},
            configured=self.config.env,
            forced={
                "CUDA_VISIBLE_DEVICES": ",".join(engine.slots),
                **({MARKER: f"{spec.instance_id}/{spec.deployment_id}"} if spec.instance_id else {}),
            },
            secrets=spec.secrets,
        )
        with log_path.open("ab") as log_file:
            try:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # its own process group: stop() signals all of it
                )
            except OSError as exc:
                raise ProviderError(
                    f"cannot start the engine for {spec.model} (deployment {spec.deployment_id}): {exc}"
                ) from exc

    @staticmethod
    def _reap(engine: _Engine | None) -> None:
        """Collect the engine's exit status (else it stays a zombie)."""
        if engine is not None and engine.process is not None:
            engine.process.poll()


def _worker_user() -> str | None:
    """nginx started by root runs its workers as `nobody`, who cannot open the 0700 directory:
    keep them as the gateway's own user."""
    if os.geteuid() != 0:
        return None
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _require_key(spec: LaunchSpec) -> None:
    if not spec.engine_key:
        raise ProviderError(f"deployment {spec.deployment_id}: no engine key; engines are never started open")


def _check_alive(ref: ClusterRef, engine: _Engine | None) -> None:
    """Raise EngineExited if the engine (or its front) ended; the log tail goes to `log_tail`."""
    proc = engine.process if engine else None
    code = proc.poll() if proc is not None else None
    exited = code is not None if proc is not None else not is_our_group(*_group_of(ref))
    model, dep = ref.data.get("model"), ref.deployment_id
    if exited:
        log_path = Path(str(ref.data.get("log", "")))
        raise EngineExited(
            f"the engine for {model} (deployment {dep}) exited with code {code if code is not None else '?'} "
            "before it was ready",
            log_tail=_log_tail(log_path),
        )
    tmp_dir = Path(str(ref.data.get("tmp_dir", "")))
    if front.failed(tmp_dir):
        raise EngineExited(
            f"the front of the engine for {model} (deployment {dep}) failed to start",
            log_tail=_log_tail(tmp_dir / "error.log"),
        )


def _orphan_ref(pid: int, deployment_id: str) -> ClusterRef:
    """A handle on an engine found by its marker: enough to stop it (its group, checked by the
    leader's start time), not to reach it."""
    return ClusterRef(
        provider=LocalProvider.name,
        name=f"orphan-{deployment_id}-{pid}",
        deployment_id=deployment_id,
        data={"pid": pid, "pgid": pid, "start_time": start_time(pid)},
    )


def _group_of(ref: ClusterRef) -> tuple[int, int | None]:
    start = ref.data.get("start_time")
    return int(ref.data["pgid"]), int(start) if start is not None else None
