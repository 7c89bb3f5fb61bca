"""A throwaway PostgreSQL server for the tests: Debian's binaries (package `postgresql`, no
cluster of its own needed), `initdb` into a temporary directory, listening on a free port of
127.0.0.1 with its unix socket in that directory, stopped by its pid (postmaster.pid).

initdb and postgres refuse to run as root: as root (CI) they run as the `postgres` user the
package creates, and the directory belongs to it."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.stub_upstream import free_port

SUPERUSER = "gateway"
INSTALL_HINT = "PostgreSQL is missing: run `make postgres` (apt-get install postgresql) or .ci/run"


def find_bin() -> Path | None:
    """The newest installed server's binaries (/usr/lib/postgresql/N/bin), if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _as_owner(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--", *argv]


@dataclass
class PostgresServer:
    root: Path
    port: int
    process: subprocess.Popen[bytes]
    started_seconds: float

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
        )

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self._connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # name: hex only
        return self.url(name)

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().splitlines()[0])

    def stop(self) -> None:
        """Fast shutdown by the postmaster's pid, then the directory goes."""
        if self.process.poll() is None:
            os.kill(self.postmaster_pid(), signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def start(bindir: Path) -> PostgresServer:
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="llmgw-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data = root / "data"
    initdb = [str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8"]
    subprocess.run(_as_owner([*initdb, "--no-sync"]), check=True, capture_output=True)
    port = free_port()
    log = (root / "postgres.log").open("ab")
    argv = [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root)]
    argv += ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"]
    argv += ["-c", "synchronous_commit=off", "-c", "max_connections=200"]
    process = subprocess.Popen(_as_owner(argv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = PostgresServer(root, port, process, 0.0)
    _wait_ready(server)
    server.started_seconds = time.monotonic() - t0
    return server


def _wait_ready(server: PostgresServer, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"postgres exited: {(server.root / 'postgres.log').read_text()}")
        try:
            with server._connect():
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.05)
