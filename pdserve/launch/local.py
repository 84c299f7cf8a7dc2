"""`pdserve up` (the default launcher): the workers as local processes, the router in this process.

Workers get free loopback ports and the cluster secret (every frame between them and the router is
authenticated). Ctrl-C stops the router, then SIGTERMs the workers, which finish their in-flight
requests and transfers before exiting. `serving.run_cluster` drives this through `LocalLauncher`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from pdserve.config.load import to_dict
from pdserve.config.schema import ROLES, ClusterConfig
from pdserve.launch.base import Launcher, WorkerHandle
from pdserve.transfer.pairing import node_identity


@dataclass
class WorkerProc:
    role: str
    index: int
    port: int
    proc: subprocess.Popen[bytes]
    pump: threading.Thread | None = None  # copies its output to our stderr until it exits

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_settings(cfg: ClusterConfig) -> dict[str, Any]:
    """The cluster's settings as its workers read them (`pdserve serve --config FILE`)."""
    data = to_dict(cfg)
    data["threads"] = cfg.threads or 1  # 0 (auto) under `up`: the workers share this machine's cores
    data["router"]["api_key"] = ""  # workers never see the HTTP key
    return data


def write_worker_settings(cfg: ClusterConfig, folder: str) -> str:
    """Write them (JSON, readable by this user only) into folder; returns the file's path."""
    path = os.path.join(folder, "cluster.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(worker_settings(cfg), f)
    return path


def worker_command(settings_path: str, role: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The `pdserve serve` command line of one worker of the cluster: every setting is in the file."""
    return [sys.executable, "-m", "pdserve.cli", "serve", "--config", settings_path, "--role", role, "--internal",
            "--host", host, "--port", str(port)]


def _pump(proc: subprocess.Popen[bytes], prefix: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(f"[{prefix}] {line.decode(errors='replace')}")
    proc.wait()  # reap it as soon as it exits, so no zombie lingers


def start_worker(role: str, index: int, secret: str, settings_path: str) -> WorkerProc:
    """One worker process (not yet ready), its output prefixed with its name on our stderr."""
    env = {**os.environ, "PDSERVE_CLUSTER_SECRET": secret}
    port = free_port()
    proc = subprocess.Popen(worker_command(settings_path, role, port), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
    w = WorkerProc(role, index, port, proc)
    w.pump = threading.Thread(target=_pump, args=(proc, w.name), daemon=True)
    w.pump.start()
    return w


def start_workers(cfg: ClusterConfig, secret: str, settings_path: str) -> list[WorkerProc]:
    return [start_worker(role, i, secret, settings_path) for role in ROLES for i in range(cfg.role(role).workers)]


def wait_ready(workers: list[WorkerProc], timeout: float = 180.0) -> None:
    """Until every worker accepts connections; raises if one exits or time runs out."""
    deadline = time.monotonic() + timeout
    pending = list(workers)
    while pending:
        for w in list(pending):
            if w.proc.poll() is not None:
                raise RuntimeError(f"{w.name} exited with status {w.proc.returncode} while starting")
            try:
                socket.create_connection(("127.0.0.1", w.port), timeout=0.2).close()
                pending.remove(w)
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers not ready after {timeout}s: {[w.name for w in pending]}")
        time.sleep(0.05)  # a connect attempt per pending worker: cheap


def stop_workers(workers: list[WorkerProc], grace: float = 30.0) -> None:
    """SIGTERM (drain), then SIGKILL whatever is still alive after `grace` seconds."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
    for w in workers:  # their last lines (drained, stopped) are on our stderr before we go on or exit
        if w.pump is not None:
            w.pump.join(timeout=2.0)


def _die_with_parent() -> None:
    """Runs in the child before exec: a worker gets SIGTERM if `up` dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop_workers still stops them on a normal exit


class LocalLauncher(Launcher):
    """Workers as child processes of this one, on loopback ports."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self._procs: list[WorkerProc] = []
        self._starting: list[WorkerProc] = []  # added, not ready yet: stop() stops these too
        self._stopped = False
        self._next = dict.fromkeys(ROLES, 0)  # the index the role's next worker gets
        self._lock = threading.Lock()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._settings = self._secret = ""

    def start(self, secret: str) -> list[WorkerHandle]:
        self._secret, self._stopped = secret, False
        self._tmp = tempfile.TemporaryDirectory(prefix="pdserve-up-")
        self._settings = write_worker_settings(self.cfg, self._tmp.name)
        with self._lock:
            self._procs = start_workers(self.cfg, secret, self._settings)
            for role in ROLES:
                self._next[role] = self.cfg.role(role).workers
        try:
            wait_ready(self._procs)
        except BaseException:
            self.stop()
            raise
        return self.workers()

    def workers(self) -> list[WorkerHandle]:
        node = node_identity()
        with self._lock:
            return [WorkerHandle(w.role, w.index, w.address, w.proc.pid, node) for w in self._procs]

    def add_worker(self, role: str) -> WorkerHandle:
        self.cfg.role(role)  # a bad role fails here
        with self._lock:
            if self._stopped:
                raise RuntimeError("the launcher is stopped")
            w = start_worker(role, self._next[role], self._secret, self._settings)
            self._next[role] += 1
            self._starting.append(w)
        try:
            wait_ready([w])  # raises if stop() stopped it meanwhile
            with self._lock:
                if self._stopped:
                    raise RuntimeError("the launcher stopped while the worker started")
                self._procs.append(w)
        except BaseException:
            stop_workers([w])
            raise
        finally:
            with self._lock:
                self._starting.remove(w)
        return WorkerHandle(w.role, w.index, w.address, w.proc.pid, node_identity())

    def remove_worker(self, role: str, address: str = "") -> WorkerHandle | None:
        with self._lock:
            w = next((w for w in reversed(self._procs) if (w.address == address if address else w.role == role)), None)
        if w is None:
            return None
        stop_workers([w])
        with self._lock:
            if w in self._procs:  # stop() may have taken it meanwhile
                self._procs.remove(w)
        return WorkerHandle(w.role, w.index, w.address, w.proc.pid, node_identity())

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            procs = self._procs + self._starting
            self._procs = []
        stop_workers(procs)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
