"""Servers the benchmarks start: each in its own session (process group) on 127.0.0.1, stopped by
its process group id, never by name."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tasks.procs import group_members

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A process started in its own session; `stop()` ends its whole group."""

    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, grace_seconds: float = 15.0) -> None:
        """SIGTERM to the group, SIGKILL after `grace_seconds`; returns when the group is empty."""
        pgid = self.process.pid
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace_seconds)
        kill_group(pgid, grace_seconds=grace_seconds)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def kill_group(pgid: int, *, grace_seconds: float = 10.0) -> None:
    """Wait up to `grace_seconds` for the group to empty after a SIGTERM, then SIGKILL it."""
    deadline = time.monotonic() + grace_seconds
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)


def start_server(
    name: str,
    argv: Sequence[str],
    *,
    port: int,
    log: Path,
    env: dict[str, str] | None = None,
    ready_path: str = "/health",
    timeout: float = 60.0,
) -> Server:
    """Start `argv` in a new session and wait until GET `ready_path` answers 200."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env if env is not None else dict(os.environ),
            start_new_session=True,
        )
    server = Server(name, process, f"http://{HOST}:{port}", log)
    try:
        wait_ok(server, ready_path, timeout)
    except BaseException:
        server.stop(grace_seconds=5)
        raise
    return server


def wait_ok(server: Server, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:
        while True:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(server.base_url + path).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} not ready after {timeout:g}s:\n{server.log_tail()}")
            time.sleep(0.05)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


def stub_server(
    workdir: Path, *, chunks: int = 200, first_gap: float = 0.0, ready_after: float = 0.0, name: str = "stub"
) -> Server:
    """The fast stub upstream (bench/stub_server.py) in its own process."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.stub_server", "--port", str(port), "--chunks", str(chunks)]
    argv += ["--first-gap-ms", str(first_gap * 1000)]
    if ready_after:
        argv += ["--ready-after", str(ready_after)]
    return start_server(name, argv, port=port, log=workdir / f"{name}.log")


def proc_status_kb(pid: int, field: str) -> int | None:
    """A `kB` field of /proc/<pid>/status, e.g. VmHWM (peak resident set) or VmRSS."""
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of `pid` (not its children), from /proc/<pid>/stat."""
    try:
        raw = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
