"""`pdserve up`: the workers as local processes, the router in this process.

Workers get free loopback ports and a fresh cluster secret (every frame between them and the
router is authenticated). Ctrl-C stops the router, then SIGTERMs the workers, which finish their
in-flight requests and transfers before exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import os
import secrets
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
from pdserve.config.schema import ClusterConfig


@dataclass
class WorkerProc:
    role: str
    index: int
    port: int
    proc: subprocess.Popen[bytes]

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


def worker_command(settings_path: str, role: str, port: int) -> list[str]:
    """The `pdserve serve` command line of one worker of the cluster: every setting is in the file."""
    return [sys.executable, "-m", "pdserve.cli", "serve", "--config", settings_path, "--role", role, "--internal",
            "--host", "127.0.0.1", "--port", str(port)]


def _pump(proc: subprocess.Popen[bytes], prefix: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(f"[{prefix}] {line.decode(errors='replace')}")
    proc.wait()  # reap it as soon as it exits, so no zombie lingers


def start_workers(cfg: ClusterConfig, secret: str, settings_path: str) -> list[WorkerProc]:
    env = {**os.environ, "PDSERVE_CLUSTER_SECRET": secret}
    procs: list[WorkerProc] = []
    for role, n in (("prefill", cfg.prefill.workers), ("decode", cfg.decode.workers),
                    ("colocated", cfg.colocated.workers)):
        for i in range(n):
            port = free_port()
            proc = subprocess.Popen(worker_command(settings_path, role, port), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent)
            w = WorkerProc(role, i, port, proc)
            threading.Thread(target=_pump, args=(proc, w.name), daemon=True).start()
            procs.append(w)
    return procs


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
        time.sleep(0.2)


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


def _serve_until_signal(server) -> None:  # type: ignore[no-untyped-def]
    """Serve until SIGINT/SIGTERM, then return (uvicorn alone would re-raise the signal and
    kill this process before it could stop the workers)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        server.capture_signals = contextlib.nullcontext  # keep our handlers
        await server.serve()

    asyncio.run(main())


def _die_with_parent() -> None:
    """Runs in the child before exec: a worker gets SIGTERM if `up` dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop_workers still stops them on a normal exit


def run_cluster(cfg: ClusterConfig) -> int:
    """Start everything, serve until interrupted, stop everything."""
    import uvicorn

    from pdserve.config.model import resolve_shape
    from pdserve.model.tokenizer import load_tokenizer
    from pdserve.serve.frontend import OpenAIFront
    from pdserve.serve.router import ClusterBackend

    # A given secret lets workers started elsewhere join (POST /admin/workers); else a fresh one.
    secret = os.environ.get("PDSERVE_CLUSTER_SECRET") or secrets.token_hex(16)
    shape = resolve_shape(cfg.model, cfg.dtype or None)  # fail fast on a bad model, before forking
    r = cfg.router
    print(f"pdserve: starting {cfg.prefill.workers} prefill, {cfg.decode.workers} decode, "
          f"{cfg.colocated.workers} colocated worker(s) for {cfg.model}...", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="pdserve-up-")
    workers = start_workers(cfg, secret, write_worker_settings(cfg, tmp.name))
    try:
        wait_ready(workers)
        by_role = {role: [w.address for w in workers if w.role == role] for role in ("prefill", "decode", "colocated")}
        backend = ClusterBackend(shape, by_role["prefill"], by_role["decode"], by_role["colocated"],
                                 secret=secret.encode(), config=r)
        name = cfg.public_model_name
        front = OpenAIFront(backend, load_tokenizer(cfg.model), name, api_key=r.api_key or None)
        port = r.port or free_port()  # --port 0: pick one, and print the real one
        auth = f' -H "Authorization: Bearer {r.api_key}"' if r.api_key else ""
        url = f"http://{r.host}:{port}"
        print(f"pdserve: serving {name} at {url}/v1  (metrics: {url}/metrics)\n"
              f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
              f"""-d '{{"model": "{name}", "prompt": "Hello, my name is", "max_tokens": 16, "temperature": 0}}'\n"""
              f"  Ctrl-C stops the cluster.", flush=True)
        server = uvicorn.Server(uvicorn.Config(front.app(), host=r.host, port=port, log_level="warning",
                                               timeout_graceful_shutdown=30))
        _serve_until_signal(server)
    finally:
        print("pdserve: stopping workers (finishing in-flight work)...", flush=True)
        stop_workers(workers)
        tmp.cleanup()
    return 0
