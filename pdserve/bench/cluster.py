"""Start and stop a `pdserve up` cluster for a benchmark, and read its workers' busy time.

`pdserve up` prints its URL and serves `/health`; the whole process group is stopped afterwards
(SIGTERM, then SIGKILL). Utilization comes from the router's `/metrics`:
`pdserve:worker_busy_fraction{worker,role}` is each worker's busy time over its uptime (polled by the
router), so the busy fraction *during one run* is recovered from two scrapes,
(b1 * u1 - b0 * u0) / (t1 - t0), with uptime u taken from the moment the cluster answered /health
(workers start a second or so earlier, so this slightly overstates short runs' busy fraction).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

_GAUGE = re.compile(r'^pdserve:worker_busy_fraction\{([^}]*)\}\s+(\S+)$', re.M)


@dataclass
class Cluster:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready_at: float = 0.0  # time.monotonic() when /health first answered 200
    label: str = ""
    args: list[str] = field(default_factory=list)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def up_args(model: str, prefill: int, decode: int, colocated: int, threads: int, port: int) -> list[str]:
    return ["up", "--model", model, "--prefill", str(prefill), "--decode", str(decode),
            "--colocated", str(colocated), "--threads", str(threads), "--host", "127.0.0.1", "--port", str(port)]


@contextlib.contextmanager
def running_cluster(args: list[str], port: int, label: str = "", timeout: float = 180.0) -> Iterator[Cluster]:
    """Run `pdserve *args` (its URL is http://127.0.0.1:port) until the block ends."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log_path = Path(tempfile.mkdtemp(prefix="pdserve-bench-")) / "cluster.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    c = Cluster(f"http://127.0.0.1:{port}", proc, log_path, label=label, args=args)
    try:
        _wait_health(c, timeout)
        yield c
    finally:
        stop(proc)


def _wait_health(c: Cluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if c.proc.poll() is not None:
                raise RuntimeError(f"pdserve {' '.join(c.args)} exited ({c.proc.returncode}):\n{c.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(c.url + "/health").status_code == 200:
                    c.ready_at = time.monotonic()
                    return
            time.sleep(0.3)
    raise RuntimeError(f"pdserve {' '.join(c.args)} not healthy after {timeout:.0f}s:\n{c.tail()}")


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` now (from /proc), so workers can be reaped if the launcher dies first."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop(proc: subprocess.Popen[bytes], grace: float = 60.0) -> None:
    """Ctrl-C the launcher (it drains and stops its workers), then make sure every descendant is gone.

    SIGINT, not SIGTERM: `pdserve up` stops its workers on Ctrl-C; on SIGTERM it can exit without them.
    """
    if proc.poll() is not None:
        return
    family = _children(proc.pid)
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in family if _alive(p)]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + 10.0
        while any(_alive(p) for p in alive) and time.monotonic() < deadline:
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def parse_busy(text: str) -> dict[str, float]:
    """{worker name: busy fraction since its start} from a /metrics page."""
    out: dict[str, float] = {}
    for labels, value in _GAUGE.findall(text):
        m = re.search(r'worker="([^"]*)"', labels)
        if m:
            out[m.group(1)] = float(value)
    return out


def scrape_busy(url: str) -> tuple[float, dict[str, float]]:
    """(time.monotonic(), per-worker busy fraction); empty when /metrics has no worker gauges."""
    try:
        text = httpx.get(url + "/metrics", timeout=5.0).text
    except httpx.HTTPError:
        text = ""
    return time.monotonic(), parse_busy(text)


def busy_during(before: tuple[float, dict[str, float]], after: tuple[float, dict[str, float]],
                ready_at: float) -> dict[str, float]:
    """Per worker: the share of [t0, t1] spent computing, from two cumulative scrapes."""
    (t0, b0), (t1, b1) = before, after
    span = max(t1 - t0, 1e-9)
    out = {}
    for w, f1 in b1.items():
        f0 = b0.get(w, 0.0)
        busy = f1 * (t1 - ready_at) - f0 * (t0 - ready_at)
        out[w] = min(1.0, max(0.0, busy / span))
    return out
