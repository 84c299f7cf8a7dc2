"""Role switching, the parts with no processes: the router's checks before it asks a worker, /health
while a worker switches, and the launcher sync that must not undo a switch. (Switches of real
workers under load: tests/test_role_switch_cluster.py.)"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from pdserve.config.model import resolve_shape
from pdserve.launch.base import WorkerHandle
from pdserve.launch.serving import sync_pools
from pdserve.serve.health import cluster_health
from pdserve.serve.router import ClusterBackend


def _backend() -> ClusterBackend:
    # Addresses nothing listens on: every check here must answer before any message is sent.
    return ClusterBackend(resolve_shape("demo"), ["127.0.0.1:9"], ["127.0.0.1:10"], [])


def test_switch_role_refuses_an_unknown_worker_or_role_and_same_role_is_a_no_op() -> None:
    be = _backend()
    p, d = be.workers
    with pytest.raises(ValueError, match="no worker named 'decode@nowhere:1'"):
        asyncio.run(be.switch_role("decode@nowhere:1", "prefill"))
    with pytest.raises(ValueError, match="role must be one of"):
        asyncio.run(be.switch_role(p.name, "gpu"))
    asyncio.run(be.switch_role(d.name, "decode"))  # already: returns at once, nothing sent
    assert not d.client.connected and d.switching == ""
    with pytest.raises(ConnectionError, match="cannot reach"):  # a real request: the worker is not there
        asyncio.run(be.switch_role(p.name, "decode", timeout_s=5))
    assert p.role == "prefill" and not p.healthy  # unreachable: out of the pools, in its old role


@dataclass
class _View:
    name: str
    role: str
    healthy: bool
    draining: bool = False
    switching: str = ""
    joined_as: str = ""

    def __post_init__(self) -> None:
        self.joined_as = self.joined_as or self.role


def test_health_names_a_switching_worker_and_still_serves_through_the_others() -> None:
    ok, body = cluster_health([_View("p", "prefill", True), _View("d", "decode", True),
                               _View("x", "prefill", False, True, "decode")])
    assert ok and body["status"] == "ok"
    assert body["workers"][2] == {"name": "x", "role": "prefill", "state": "switching", "switching_to": "decode"}
    assert "switching_to" not in body["workers"][0]
    assert body["roles"]["prefill"] == {"available": 1, "total": 2}
    _, body = cluster_health([_View("x", "prefill", False, True)])  # draining, not switching
    assert body["workers"][0]["state"] == "draining"


def test_health_shows_the_current_role_of_a_switched_worker_and_the_role_its_name_carries() -> None:
    _, body = cluster_health([_View("prefill@h:1", "decode", True, joined_as="prefill"),
                              _View("decode@h:2", "decode", True)])
    assert body["workers"] == [{"name": "prefill@h:1", "role": "decode", "state": "up", "joined_as": "prefill"},
                               {"name": "decode@h:2", "role": "decode", "state": "up"}]
    assert body["roles"] == {"decode": {"available": 2, "total": 2}}


def test_a_switched_worker_keeps_its_name_and_reports_its_new_role_in_metrics() -> None:
    """The name is the worker's id (metrics series, prefix index, `pdserve role NAME`): a switch
    changes the `role` label, not the `worker` one, and the old role's series goes."""
    from prometheus_client.parser import text_string_to_metric_families

    from pdserve.serve.metrics import ServerMetrics

    be = _backend()
    p, _ = be.workers
    m = ServerMetrics(be.stats, worker_stats=be.worker_stats)
    assert b'pdserve:worker_up{role="prefill",worker="prefill@127.0.0.1:9"}' in m.render()
    p.role = "decode"  # as its heartbeat sets it once it serves as decode (worker_link.heartbeat)
    ups = [s.labels for f in text_string_to_metric_families(m.render().decode()) for s in f.samples
           if s.name == "pdserve:worker_up"]
    assert ups == [{"worker": "prefill@127.0.0.1:9", "role": "decode"},
                   {"worker": "decode@127.0.0.1:10", "role": "decode"}]
    assert p.name == "prefill@127.0.0.1:9" and cluster_health(be.workers)[1]["workers"][0]["joined_as"] == "prefill"


@dataclass
class _Client:
    address: str


@dataclass
class _Worker:
    role: str
    client: _Client


@dataclass
class _Pools:
    """The router side of sync_pools: its workers, and what it was asked to add or remove."""

    workers: list[_Worker]
    added: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    async def add_worker(self, role: str, address: str) -> str:
        self.added.append((role, address))
        self.workers.append(_Worker(role, _Client(address)))
        return f"{role}@{address}"

    async def remove_worker(self, address: str) -> bool:
        self.removed.append(address)
        self.workers = [w for w in self.workers if w.client.address != address]
        return True


@dataclass
class _Launcher:
    handles: list[WorkerHandle]

    def workers(self) -> list[WorkerHandle]:
        return list(self.handles)


def test_launcher_sync_keeps_a_worker_that_switched_roles() -> None:
    """The launcher started it as prefill; it now serves as decode. Same address, same worker:
    neither removed (it would lose its requests) nor added a second time."""
    launcher = _Launcher([WorkerHandle("prefill", 0, "h:1", 11), WorkerHandle("decode", 0, "h:2", 12)])
    pools = _Pools([_Worker("decode", _Client("h:1")), _Worker("decode", _Client("h:2"))])
    known: set[str] = set()
    for _ in range(2):
        asyncio.run(sync_pools(pools, launcher, known))
    assert pools.added == [] and pools.removed == [] and len(pools.workers) == 2
    launcher.handles.append(WorkerHandle("colocated", 0, "h:3", 13))  # a new one joins as the launcher says
    launcher.handles.pop(0)  # and one the launcher stopped leaves
    asyncio.run(sync_pools(pools, launcher, known))
    assert pools.added == [("colocated", "h:3")] and pools.removed == ["h:1"]


def test_a_worker_that_refused_a_request_while_switching_may_serve_it_in_its_new_role() -> None:
    # The race the cluster test can hit: a request handed back by a switching worker, then refused by
    # the next one to switch, had every worker of its pool avoided for good and was rejected (503).
    be = _backend()
    p, d = be.workers
    avoid, refused = {p.name, d.name}, {p.name: "prefill", d.name: "decode"}
    p.switching, p.healthy = "decode", False
    d.healthy = True
    be._forget_rejoined(avoid, refused)
    assert avoid == {p.name, d.name}  # one still switching, one in the role it refused in: both stay
    p.role, p.switching, p.healthy = "decode", "", True
    be._forget_rejoined(avoid, refused)
    assert avoid == {d.name} and refused == {d.name: "decode"}  # back in a new role: it may serve it


def test_no_worker_while_one_switches_is_retried_not_refused() -> None:
    from pdserve.engine.sampler import SamplingParams
    from pdserve.serve.worker_link import Retryable

    be = _backend()
    p, d = be.workers
    p.healthy = d.healthy = False  # neither is available to the policy
    with pytest.raises(Exception) as refused:
        be._attempt("r", [1, 2, 3], SamplingParams(max_tokens=1), frozenset(), frozenset(), [])
    assert not isinstance(refused.value, Retryable) and refused.value.status == 503
    d.switching = "prefill"
    with pytest.raises(Retryable, match="switching roles") as retried:
        be._attempt("r", [1, 2, 3], SamplingParams(max_tokens=1), frozenset(), frozenset(), [])
    assert not retried.value.fault and retried.value.worker == ""
