"""One pdserve worker on a Ray node: a small actor that starts and supervises `pdserve serve`.

Why an actor around a process, not the worker inside the actor: the worker stays the very
program the local launcher runs (its own signal handling, drain, torch threads, one event loop
and engine thread, nothing of Ray's in its address space), and Ray still places it, restarts it
and reaps it:
- placement: the actor carries the role's resources, so Ray puts the process where they are
  (GPUs: the process inherits the actor's CUDA_VISIBLE_DEVICES);
- restarts: when the process dies (SIGKILL, a crash) the actor exits too, and Ray restarts it,
  at most `max_restarts` times; the new incarnation starts a fresh process (on any node with
  the resources if the old node is gone) and the launcher re-registers its new address;
- reaping: the process gets SIGTERM when its actor dies (PR_SET_PDEATHSIG), and the actor dies
  with its owner, the `pdserve up` driver, however that ends.

The cluster secret arrives as a constructor argument (in Ray's control plane, like every actor
argument; never in `runtime_env` env vars, which the dashboard shows, nor on a command line or in
a log). The actor writes it to a 0600 file in a 0700 directory on its node, hands the process the
file's path (`PDSERVE_CLUSTER_SECRET_FILE`), and deletes the directory once the worker is ready.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

from pdserve.launch.local import _die_with_parent, worker_command
from pdserve.transfer.pairing import NODE_ENV

READY = re.compile(r"READY \w+ \S+:(\d+) pid=(\d+)")
SECRET_VARS = ("PDSERVE_CLUSTER_SECRET", "PDSERVE_CLUSTER_SECRET_FILE")


def _private_file(folder: str, name: str, text: str) -> str:
    path = os.path.join(folder, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


class WorkerSupervisor:
    """Decorated with `ray.remote` by the launcher (so importing this module needs no Ray)."""

    def __init__(self, role: str, index: int, settings_json: str, secret: str, bind_node_address: bool) -> None:
        import ray

        self.role, self.index, self.name = role, index, f"{role}-{index}"
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = ray.util.get_node_ip_address() if bind_node_address else "127.0.0.1"
        self._stopping = False
        folder = tempfile.mkdtemp(prefix="pdserve-ray-")  # 0700
        try:
            settings = _private_file(folder, "cluster.json", settings_json)
            env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
            env["PDSERVE_CLUSTER_SECRET_FILE"] = _private_file(folder, "secret", secret)
            env[NODE_ENV] = self.node_id
            self.proc = subprocess.Popen(worker_command(settings, role, 0, self.host), env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_die_with_parent)
            self.port = self._until_ready()
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the worker has read both files by now
        threading.Thread(target=self._supervise, daemon=True).start()

    def _until_ready(self) -> int:
        """Echo the process's output until its READY line; its port (it bound port 0 itself)."""
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            sys.stdout.write(f"[{self.name}] {line}")
            m = READY.search(line)
            if m:
                sys.stdout.flush()
                return int(m.group(1))
        status = self.proc.wait()
        raise RuntimeError(f"{self.name} exited with status {status} while starting")

    def _supervise(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            sys.stdout.write(f"[{self.name}] {raw.decode(errors='replace')}")
        status = self.proc.wait()
        if not self._stopping:
            # Dying with it is what lets Ray restart the pair, within max_restarts.
            print(f"[{self.name}] worker process exited with status {status}; its actor exits for Ray to restart",
                  flush=True)
            os._exit(1)

    def info(self) -> dict[str, object]:
        return {"role": self.role, "index": self.index, "address": f"{self.host}:{self.port}",
                "pid": self.proc.pid, "node_id": self.node_id}

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM (the worker drains), SIGKILL after `grace` seconds; its exit status."""
        self._stopping = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
