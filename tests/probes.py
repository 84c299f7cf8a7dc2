"""Looking at a running cluster from outside: its workers' own Stats (over the authenticated RPC),
the router's /metrics, and the READY lines `pdserve up` prints for each worker."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pdserve.serve import messages as m
from pdserve.transfer.frames import read_frame_sync, write_frame_sync


@dataclass(frozen=True)
class WorkerInfo:
    name: str  # role-index, as `up` prefixes its lines
    role: str
    port: int
    pid: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def router_name(self) -> str:
        """The `worker` label of the router's per-worker gauges."""
        return f"{self.role}@{self.address}"


def workers_of(output: str) -> dict[str, WorkerInfo]:
    """role-index -> worker, from the READY lines in `pdserve up`'s output."""
    return {f"{g[0]}-{g[1]}": WorkerInfo(f"{g[0]}-{g[1]}", g[0], int(g[3]), int(g[4]))
            for g in re.findall(r"\[(\w+)-(\d+)\] READY (\w+) [0-9.]+:(\d+) pid=(\d+)", output)}


def _rpc(port: int, secret: bytes | None, msg: m.ToWorker, timeout: float = 5.0) -> m.ToRouter:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        write_frame_sync(s, m.encode(msg), b"", secret)
        header, _ = read_frame_sync(s, secret=secret)
    return m.decode_to_router(header)


def stats(port: int, secret: bytes | None) -> m.Stats:
    """A worker's own view of itself (not the router's cached copy)."""
    reply = _rpc(port, secret, m.StatsQuery("probe"))
    assert isinstance(reply, m.Stats), reply
    return reply


def reserve(port: int, secret: bytes | None, rid: str, prompt: list[int], max_tokens: int = 4) -> m.Reserved:
    """Ask a decode worker for a reservation directly, as the router would."""
    reply = _rpc(port, secret, m.Reserve(rid, prompt, m.Params(max_tokens=max_tokens)))
    assert isinstance(reply, m.Reserved), reply
    return reply


def metrics(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)] from the router's /metrics."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10, trust_env=False).text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def worker_gauge(url: str, name: str) -> dict[str, float]:
    """worker label -> value of `pdserve:worker_<name>`."""
    return {labels["worker"]: v for labels, v in metrics(url).get(f"pdserve:worker_{name}", [])}


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> float:
    """Poll `cond` until it is true; returns the seconds it took, fails naming `what`."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout:.1f}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def parallel(fns: list) -> list:  # type: ignore[type-arg]
    """Run callables at once in threads; their results in order (an exception is re-raised)."""
    out: list = [None] * len(fns)

    def run(i: int) -> None:
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out
