"""The authenticating front of an engine: nginx in front of vLLM.

vLLM's `--api-key` guards only some routes (`/invocations`, `/pause`, `/update_weights`,
`/metrics` stay open), so the engine never listens where a caller can reach it: it listens on a
Unix socket in a 0700 directory (local) or on 127.0.0.1 (a cluster node), and nginx listens in
its place. nginx passes exactly the routes the gateway uses, each with its method, and only
with `Authorization: Bearer <engine key>`; `/health` is open (probes need no key); everything
else is 403. It drops the caller's Authorization before vLLM sees the request, and buffers
nothing (streams pass as they come).

The config is plain text rendered here for both providers; the key is the one value that is
filled in where nginx runs (`KEY_PLACEHOLDER`), so a cluster gets it only through `secrets:`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Routes the gateway sends to an engine, with the method each takes (see gateway/api).
KEYED_ROUTES = {
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/embeddings": "POST",
    "/v1/models": "GET",
}
OPEN_ROUTES = {"/health": "GET"}
KEY_PLACEHOLDER = "__LLMGW_ENGINE_KEY__"
DIR_PLACEHOLDER = "__LLMGW_FRONT_DIR__"
# Temp paths nginx creates at start (default: /var/lib/nginx, not writable by the gateway's user).
_TEMP_PATHS = {
    "client_body": "http_client_body",
    "proxy": "http_proxy",
    "fastcgi": "http_fastcgi",
    "uwsgi": "http_uwsgi",
    "scgi": "http_scgi",
}
# Generation can take minutes between two bytes of a non-streamed answer.
READ_TIMEOUT_SECONDS = 3600
# Each request holds two of a worker's connections (the gateway's, the engine's). The gateway opens
# up to 1,000 to one engine (a herd of cold requests all at once): at nginx's default of 1024 the
# front closed about 40% of them, which the gateway answered 502.
WORKER_CONNECTIONS = 8192


@dataclass(frozen=True)
class FrontConfig:
    listen: str  # host:port, e.g. 127.0.0.1:41234 (local) or 0.0.0.0:8000 (a node)
    upstream: str  # unix:/path/to/engine.sock or 127.0.0.1:8001
    directory: str = DIR_PLACEHOLDER  # pid file, logs and temp files
    user: str | None = None  # worker user when nginx starts as root (else: nobody)
    missing_modules: frozenset[str] = frozenset()  # e.g. {"uwsgi"} for nginx-light builds


def _error(status: int, message: str, kind: str) -> str:
    """`return` with an OpenAI error envelope (the proxy passes engine answers through)."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}})
    return f"return {status} '{body}';"


_UNAUTHORIZED = _error(401, "engine key missing or wrong", "authentication_error")
_FORBIDDEN = _error(403, "route not served by this engine", "permission_error")


def _location(path: str, method: str, *, key: str | None) -> str:
    check = f'            if ($http_authorization != "Bearer {key}") {{ {_UNAUTHORIZED} }}\n' if key else ""
    return (
        f"        location = {path} {{\n"
        f"            limit_except {method} {{ deny all; }}\n"  # 403 for other methods
        f"{check}"
        "            proxy_pass http://engine;\n"
        "        }\n"
    )


def nginx_config(front: FrontConfig, key: str = KEY_PLACEHOLDER) -> str:
    """The whole nginx.conf. `key` is the engine key (hex), or the placeholder to fill later."""
    if not key or any(c in key for c in "\"'\\;{}$ \n"):
        raise ValueError("the engine key must be a plain token (hex)")
    d = front.directory
    temp = "".join(
        f"    {name}_temp_path {d}/{sub};\n"
        for name, sub in _TEMP_PATHS.items()
        if name not in front.missing_modules
    )
    locations = "".join(
        [_location(p, m, key=None) for p, m in OPEN_ROUTES.items()]
        + [_location(p, m, key=key) for p, m in KEYED_ROUTES.items()]
    )
    user = f"user {front.user};\n" if front.user else ""
    return (
        f"# llm-gateway engine front (generated)\n{user}daemon off;\nmaster_process on;\n"
        f"worker_processes 1;\nworker_rlimit_nofile {2 * WORKER_CONNECTIONS};\n"
        f"pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
        f"events {{ worker_connections {WORKER_CONNECTIONS}; }}\n"
        "http {\n"
        "    access_log off;\n"
        "    server_tokens off;\n"
        f"{temp}"
        f"    upstream engine {{ server {front.upstream}; keepalive 16; }}\n"
        "    server {\n"
        f"        listen {front.listen};\n"
        "        client_max_body_size 64m;\n"
        "        default_type application/json;\n"
        "        proxy_http_version 1.1;\n"
        '        proxy_set_header Connection "";\n'
        '        proxy_set_header Authorization "";\n'
        "        proxy_buffering off;\n"
        "        proxy_request_buffering off;\n"
        f"        proxy_read_timeout {READ_TIMEOUT_SECONDS}s;\n"
        f"        proxy_send_timeout {READ_TIMEOUT_SECONDS}s;\n"
        f"{locations}"
        f"        location / {{ {_FORBIDDEN} }}\n"
        "    }\n"
        "}\n"
    )


def find_nginx() -> str | None:
    """nginx on PATH, or where Debian puts it (not on a normal user's PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def missing_modules(nginx: str) -> frozenset[str]:
    """The modules with temp paths this nginx was built without (`nginx -V`)."""
    out = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10, check=False).stderr
    return frozenset(name for name in _TEMP_PATHS if f"--without-http_{name}_module" in out)


# Starts nginx in the background, then becomes the engine (exec): both in one process group, the
# engine keeping the pid of the group's leader. Everything comes in as arguments, so nothing is
# quoted. (A process cannot join the group of another session, so the one process that starts a
# session has to start both.)
_LAUNCHER = (
    'nginx="$1"; dir="$2"; shift 2; '
    '"$nginx" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" </dev/null >"$dir/front.log" 2>&1 & '
    'exec "$@"'
)


def launcher(nginx: str, directory: Path, engine_argv: Sequence[str]) -> list[str]:
    """The argv that runs nginx (config in `directory`) beside the engine `engine_argv`."""
    return ["/bin/sh", "-c", _LAUNCHER, "llmgw-engine", nginx, str(directory), *engine_argv]


def failed(directory: Path) -> bool:
    """nginx logs a fatal start-up error (a taken port, a bad config) as [emerg] and exits."""
    try:
        return "[emerg]" in (directory / "error.log").read_text(errors="replace")
    except OSError:
        return False
