"""Process-group helpers for engines started in their own session (Linux /proc based)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    rest = raw[raw.rfind(")") + 2 :].split()
    return rest  # rest[0] is field 3 (state), rest[2] is field 5 (pgrp), rest[19] is field 22


def start_time(pid: int) -> int | None:
    """Kernel start time of `pid` in clock ticks since boot; None if no such process.

    Stored with a process id so that a recycled pid is never mistaken for our engine."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def is_our_group(pgid: int, leader_start_time: int | None) -> bool:
    """True if the group still has members and its leader, if alive, is the process we started.

    A pid is not reused as long as a process group of that id has members, so members of a
    group whose leader has exited are still ours."""
    if not group_members(pgid):
        return False
    current = start_time(pgid)
    return current is None or leader_start_time is None or current == leader_start_time


def marked_leaders(name: str) -> dict[int, str]:
    """Live process-group leaders whose environment has `name`: pid → its value. Reads only
    what /proc lets this user read (its own processes, or all of them as root)."""
    needle = f"{name}=".encode()
    found = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fields = _stat_fields(pid)
        if not fields or fields[0] == "Z" or int(fields[2]) != pid:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(needle):
                found[pid] = item[len(needle) :].decode(errors="replace")
    return found
