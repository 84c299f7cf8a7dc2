"""Processes the suite started, found through /proc (Linux): who descends from whom, who is left.

Every process the suite starts inherits `MARK` in its environment (conftest sets it for the
session), so a worker that outlived its parent — reparented to init, in a session of its own — is
still found, and a test that leaves one behind fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

MARK = "PDSERVE_TEST_SESSION"


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    """Running (a zombie has exited: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of `pid` right now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _ppid(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def marked(value: str) -> list[int]:
    """Live pdserve processes whose environment carries MARK=value (started by this test session).
    Helpers of the test process itself (multiprocessing's resource tracker) are not counted."""
    needle = f"{MARK}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
            argv = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if needle in env.split(b"\0") and b"pdserve" in argv and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def cmdline(pid: int) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]


def kill_and_wait(pids: list[int], timeout: float = 10.0) -> list[int]:
    """SIGKILL `pids` and wait until they are gone (or zombies); returns those still alive."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return wait_gone(pids, timeout)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until every pid has exited; returns those still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left
