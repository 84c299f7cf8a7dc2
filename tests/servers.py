"""Start real `pdserve` processes on loopback ports for process-level tests.

    with running_server(["serve", "--role", "colocated", "--model", "demo", "--threads", "1"]) as srv:
        httpx.get(srv.url + "/v1/models")

The helper picks a free port and appends `--host 127.0.0.1 --port P` (unless the arguments already
name a port, or `port_flag=None`), waits until `GET url + health_path` answers 200, and on exit
stops the whole process group (SIGTERM, then SIGKILL) and any descendant that outlived it (`up`'s
workers lead sessions of their own). If the port free_port() found is taken before the server
binds it, `running_server` starts again on another. For commands that choose their own address and
print it (`pdserve up ...`), pass `url_pattern`: a regex whose first group (or whole match) is the
base URL, looked for in the process's combined stdout/stderr.

`start_server` starts one without waiting (to start several side by side); then `wait_ready()`
and `stop()`. `start_worker` starts an internal worker on port 0 and reads the port it bound from
its READY line (no race at all); `start_workers` starts several side by side, and
`launch_worker` + `worker_ready` start one in the background of something else.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.procs import alive, descendants, kill_and_wait

HOST = "127.0.0.1"
PORT_RETRIES = 3  # restarts when the port free_port() found was taken before the server bound it


def free_port(host: str = HOST) -> int:
    """A TCP port that is free right now on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str  # base URL without a trailing slash, e.g. http://127.0.0.1:40123
    port: int
    proc: subprocess.Popen
    log_path: Path  # combined stdout + stderr of the process
    args: list[str] = field(default_factory=list)  # the pdserve arguments it was started with

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, health_path: str = "/health", timeout: float = 60.0, url_pattern: str | None = None) -> None:
        _wait_ready(self, self.args, health_path, timeout, url_pattern)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds."""
        _stop(self.proc, grace)


class ServerError(RuntimeError):
    """The server died or never became ready; the message carries its output tail."""


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the process leads its own group (start_new_session)


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the group, wait `grace` s, then SIGKILL it and every process descended from it.

    Workers of `pdserve up` lead sessions of their own (start_new_session), so the group's SIGKILL
    does not reach them: they are found through /proc before their parent goes, and killed too."""
    children = descendants(proc.pid)
    if proc.poll() is None:
        _killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    kill_and_wait([pid for pid in children if alive(pid)])


def start_server(
    args: list[str],
    env: dict[str, str] | None = None,
    *,
    port_flag: str | None = "--port",
    host_flag: str | None = "--host",
) -> Server:
    """Start `pdserve *args` and return at once (not ready yet): see `Server.wait_ready`, `Server.stop`.

    Use this to start several servers side by side; `running_server` is the usual entry point."""
    args = list(args)
    port = 0
    if port_flag is not None:
        if port_flag in args:
            port = int(args[args.index(port_flag) + 1])
        else:
            port = free_port()
            args += [port_flag, str(port)]
        if host_flag is not None and host_flag not in args:
            args += [host_flag, HOST]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false"}
    full_env.update(env or {})
    log_path = Path(tempfile.mkdtemp(prefix="pdserve-test-")) / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", *args], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
                                start_new_session=True)
    return Server(f"http://{HOST}:{port}", port, proc, log_path, args)


@contextlib.contextmanager
def running_server(
    args: list[str],
    env: dict[str, str] | None = None,
    *,
    health_path: str = "/health",
    timeout: float = 60.0,
    port_flag: str | None = "--port",
    host_flag: str | None = "--host",
    url_pattern: str | None = None,
    stop_grace: float = 10.0,
) -> Iterator[Server]:
    """Run `pdserve *args` until the block ends; yields a `Server` whose `health_path` answered 200.

    `url_pattern`: for commands that print where they serve; a regex whose first group (or whole
    match) is the base URL, searched for in the process's output (then `port_flag=None` as a rule)."""
    for tries_left in range(PORT_RETRIES, -1, -1):
        server = start_server(args, env, port_flag=port_flag, host_flag=host_flag)
        try:
            server.wait_ready(health_path, timeout, url_pattern)
            break
        except ServerError as e:
            # free_port() releases the port it found: another process may bind it before the
            # server does. Only then, and only for a port we chose, start again on a new one.
            chose_port = port_flag is not None and port_flag not in args
            if not (chose_port and tries_left and "address already in use" in str(e).lower()):
                raise
    try:
        yield server
    finally:
        server.stop(stop_grace)


def _wait_ready(server: Server, args: list[str], health_path: str, timeout: float,
                url_pattern: str | None) -> None:
    deadline = time.monotonic() + timeout
    url_found = url_pattern is None
    last_err = ""
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise ServerError(f"pdserve {' '.join(args)} exited with code {server.proc.returncode} "
                                  f"before it was ready; output tail:\n{server.tail()}")
            if not url_found:
                assert url_pattern is not None
                m = re.search(url_pattern, server.output())
                if m:
                    server.url = (m.group(1) if m.groups() else m.group(0)).rstrip("/")
                    server.port = httpx.URL(server.url).port or server.port
                    url_found = True
            if url_found:
                try:
                    r = client.get(server.url + health_path)
                    if r.status_code == 200:
                        return
                    last_err = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    last_err = repr(e)
            time.sleep(0.05)
    _stop(server.proc, 5.0)
    raise ServerError(f"pdserve {' '.join(args)} not ready at {server.url}{health_path} within {timeout:.0f}s "
                      f"(last: {last_err or 'no URL printed yet'}); output tail:\n{server.tail()}")


def wait_output(server: Server, pattern: str, timeout: float = 120.0) -> re.Match[str]:
    """The first match of `pattern` in the server's output, waiting for it (e.g. a READY line)."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, server.output())
        if m:
            return m
        if not server.alive():
            raise ServerError(f"exited with code {server.proc.returncode}; output tail:\n{server.tail()}")
        if time.monotonic() > deadline:
            raise ServerError(f"{pattern!r} not in the output within {timeout:.0f}s; tail:\n{server.tail()}")
        time.sleep(0.1)


def start_worker(role: str, model: str, *extra: str, env: dict[str, str] | None = None,
                 port: int = 0, timeout: float = 120.0) -> Server:
    """`pdserve serve --role ROLE --internal` on `port` (0: the OS picks one, no bind race); returns
    once it printed READY, with `port` the one it bound."""
    return start_workers([(role, model, *extra)], env=env, port=port, timeout=timeout)[0]


def start_workers(specs: list[tuple[str, ...]], env: dict[str, str] | None = None, *, port: int = 0,
                  timeout: float = 120.0) -> list[Server]:
    """Several `start_worker`s side by side, each spec `(role, model, *extra)`: all are started, then
    each is waited for (a worker's start is mostly imports and model build: they overlap)."""
    servers = [launch_worker(*spec, env=env, port=port) for spec in specs]
    try:
        for server in servers:
            worker_ready(server, timeout)
    except ServerError:
        for server in servers:
            server.stop(5)
        raise
    return servers


def launch_worker(role: str, model: str, *extra: str, env: dict[str, str] | None = None, port: int = 0) -> Server:
    """Start `pdserve serve --role ROLE --internal` and return at once: `worker_ready` waits for it."""
    args = ["serve", "--role", role, "--internal", "--model", model, "--threads", "1",
            "--host", HOST, "--port", str(port), *extra]
    return start_server(args, env, port_flag=None)


def worker_ready(server: Server, timeout: float = 120.0) -> None:
    """Until a `launch_worker` worker printed READY; then `port` is the one it bound."""
    role = server.args[server.args.index("--role") + 1]
    m = wait_output(server, rf"READY {role} [0-9.]+:(\d+) pid=\d+", timeout)
    server.port = int(m.group(1))
    server.url = f"{HOST}:{server.port}"  # an RPC address, not HTTP
