"""`pdserve up --launcher ray`: every worker in a Ray actor on the Ray cluster, the router here.

The `pdserve up` process is the Ray driver and runs the router (so the HTTP endpoint is where
`up` runs, and Ctrl-C stops exactly what it started). Each worker is a `WorkerSupervisor` actor
(`ray_actor.py` says why an actor around a process) placed by its role's `ray_resources` and
`ray_strategy`. A monitor thread asks every actor where its worker is, once per `POLL_S`:
a restarted actor (its process was killed, or its node lost) reports its new address and the
router's pools follow (`serving.follow`); an actor Ray gave up on leaves the list.

`ray` is imported here only: the local launcher never needs it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from pdserve.config.schema import ROLES, ClusterConfig
from pdserve.launch.base import Launcher, WorkerHandle
from pdserve.launch.local import worker_settings
from pdserve.launch.ray_actor import WorkerSupervisor

POLL_S = 0.5
START_TIMEOUT_S = 300.0
STOP_GRACE_S = 30.0
ANSWER_S = 2.0  # a live actor answers info() within this, even on a loaded machine


def actor_options(resources: dict[str, float], strategy: str, max_restarts: int) -> dict[str, Any]:
    """`ray.remote` options of one worker's actor: CPU and GPU as Ray's own counts, every other
    key a custom resource; spread, or Ray's default placement (which fills a node first)."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    opts: dict[str, Any] = {"max_restarts": max_restarts, "max_task_retries": 0, "resources": custom,
                            "scheduling_strategy": "SPREAD" if strategy == "spread" else "DEFAULT"}
    if "CPU" in resources:
        opts["num_cpus"] = resources["CPU"]
    if "GPU" in resources:
        opts["num_gpus"] = resources["GPU"]
    return opts


class _Actor:
    """The launcher's record of one worker's actor."""

    def __init__(self, role: str, index: int, handle: Any) -> None:
        self.role, self.index, self.handle = role, index, handle
        self.info: WorkerHandle | None = None  # where its worker is, as last reported
        self.pending: Any = None  # an info() call in flight
        self.incarnations = 0  # worker processes seen (1 + restarts)


class RayLauncher(Launcher):
    """Workers as Ray actors; the same calls as the local launcher."""

    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self._actors: list[_Actor] = []
        self._next = dict.fromkeys(ROLES, 0)
        self._lock = threading.Lock()
        self._secret = ""
        self._settings = json.dumps(worker_settings(cfg))
        self._owns_connection = False  # we called ray.init, so we disconnect (a private cluster stops)
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._remote = ray.remote(WorkerSupervisor)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self, secret: str) -> list[WorkerHandle]:
        self._secret = secret
        if not ray.is_initialized():
            address = self.cfg.launch.ray_address
            # No dashboard: plain `ray` (no [default] extra) must do.
            ray.init(address=address or None, **({} if address else {"include_dashboard": False}))
            self._owns_connection = True
        try:
            created = [self._create(role) for role in ROLES for _ in range(self.cfg.role(role).workers)]
            self._wait_ready(created, START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        self._monitor = threading.Thread(target=self._watch, name="pdserve-ray-monitor", daemon=True)
        self._monitor.start()
        return self.workers()

    def workers(self) -> list[WorkerHandle]:
        with self._lock:
            return [a.info for a in self._actors if a.info is not None]

    def add_worker(self, role: str) -> WorkerHandle:
        self.cfg.role(role)  # a bad role fails here
        a = self._create(role)
        try:
            self._wait_ready([a], START_TIMEOUT_S)
        except BaseException:
            self._kill(a)
            raise
        assert a.info is not None
        return a.info

    def remove_worker(self, role: str, address: str = "") -> WorkerHandle | None:
        with self._lock:
            a = next((a for a in reversed(self._actors)
                      if (a.info is not None and a.info.address == address if address else a.role == role)), None)
            if a is None:
                return None
            self._actors.remove(a)  # the router stops routing to it now; it drains meanwhile
        info = a.info
        self._stop_actors([a])
        return info

    def stop(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        with self._lock:
            actors, self._actors = self._actors, []
        self._stop_actors(actors)
        if self._owns_connection:
            ray.shutdown()  # a cluster we connected to keeps running; a private one stops
            self._owns_connection = False

    # ---- the actors -----------------------------------------------------------------------------
    def _create(self, role: str) -> _Actor:
        sec = self.cfg.role(role)
        with self._lock:
            index = self._next[role]
            self._next[role] += 1
        opts = actor_options(sec.ray_resources, sec.ray_strategy, self.cfg.launch.ray_max_restarts)
        handle = self._remote.options(**opts).remote(role, index, self._settings, self._secret,
                                                     self.cfg.launch.ray_bind_node_address)
        a = _Actor(role, index, handle)
        with self._lock:
            self._actors.append(a)
        return a

    def _wait_ready(self, actors: list[_Actor], timeout: float) -> None:
        try:
            infos = ray.get([a.handle.info.remote() for a in actors], timeout=timeout)
        except GetTimeoutError:
            raise RuntimeError(f"workers not ready after {timeout:.0f}s (no node has their ray_resources?): "
                               f"{[f'{a.role}-{a.index}' for a in actors]}") from None
        for a, info in zip(actors, infos, strict=True):
            self._update(a, info)

    def _update(self, a: _Actor, info: dict[str, Any]) -> None:
        h = WorkerHandle(str(info["role"]), int(info["index"]), str(info["address"]), int(info["pid"]),
                         str(info["node_id"]))
        if a.info is not None and a.info == h:
            return
        a.incarnations += 1
        how = "restarted" if a.info is not None else "up"
        print(f"pdserve: {h.name} {how} on node {h.node_id[:12]} at {h.address} pid={h.pid}", flush=True)
        with self._lock:
            a.info = h

    def _watch(self) -> None:
        """Monitor thread: keep each actor's reported address current."""
        while not self._stop.wait(POLL_S):
            with self._lock:
                actors = list(self._actors)
            for a in actors:
                if a.pending is None:
                    a.pending = a.handle.info.remote()
            ready, _ = ray.wait([a.pending for a in actors], num_returns=len(actors), timeout=POLL_S)
            done = set(ready)
            for a in actors:
                if a.pending not in done:
                    continue
                ref, a.pending = a.pending, None
                try:
                    self._update(a, ray.get(ref))
                except ActorUnavailableError:
                    pass  # restarting: its new address comes with a later answer
                except RayActorError as e:  # restarts used up (a restarting actor's calls wait)
                    print(f"pdserve: {a.role}-{a.index} is gone for good ({type(e).__name__})", flush=True)
                    with self._lock:
                        if a in self._actors:
                            self._actors.remove(a)

    def _stop_actors(self, actors: list[_Actor]) -> None:
        """Drain the workers (SIGTERM, in parallel), then end their actors for good. An actor
        that does not answer at once (its node is gone, it waits for a restart) is just ended."""
        probes = {a.handle.info.remote(): a for a in actors}
        answered, _ = ray.wait(list(probes), num_returns=len(probes), timeout=ANSWER_S) if probes else ([], [])
        refs = [probes[r].handle.stop.remote(STOP_GRACE_S) for r in answered]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S + 10)
        for a in actors:
            self._kill(a)

    def _kill(self, a: _Actor) -> None:
        with self._lock:
            if a in self._actors:
                self._actors.remove(a)
        try:
            ray.kill(a.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass

