"""The planner loop (serve/planner_loop.py): observe the front's registry, decide, act through callables.

The cluster here is an in-process set of named workers whose `switch` callable changes their role
(the loop's own unit, stepped by hand); the metrics are the front's real `ServerMetrics`."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys

import pytest
from prometheus_client import generate_latest

from pdserve.config.schema import ConfigError
from pdserve.launch.base import WorkerHandle
from pdserve.sched.sla_planner import PlannerSettings, SlaPlanner, Split
from pdserve.serve.metrics import ServerMetrics
from pdserve.serve.planner_loop import (
    PlannerLoop,
    address_of,
    moves,
    observe,
    quantile,
    require_switch,
    snapshot,
)


class Capacity:
    """Prefill 4000 prompt tokens/s, decode 2000 output tokens/s per instance; colocated never better."""

    def prefill_rate(self, prompt: float, ttft_s: float) -> float:
        return 4000 / prompt

    def decode_rate(self, prompt: float, output: float, tpot_s: float) -> float:
        return 2000 / output

    def colocated_rate(self, prompt: float, output: float, ttft_s: float, tpot_s: float) -> float:
        return 0.1 / (1 / self.prefill_rate(prompt, ttft_s) + 1 / self.decode_rate(prompt, output, tpot_s))

    def expected(self, mode: str, prompt: float, output: float, rate: float) -> tuple[float, float]:
        return 0.5, 0.03


class Cluster:
    def __init__(self, roles: list[str]) -> None:
        self.roles = {f"w{i}": r for i, r in enumerate(roles)}
        self.calls: list[tuple[str, str]] = []
        self.inflight: dict[str, float] = {}  # per worker; else its index (every load distinct)

    def workers(self) -> list[tuple[str, str, dict[str, float]]]:
        return [(n, r, {"busy_fraction": 0.5, "inflight": self.inflight.get(n, float(i))})
                for i, (n, r) in enumerate(self.roles.items())]

    async def switch(self, name: str, role: str) -> None:
        self.calls.append((name, role))
        self.roles[name] = role


class Launcher:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.log: list[str] = []
        self.started = dict(cluster.roles)  # the role it started each worker in, as a launcher lists it

    def add_worker(self, role: str) -> None:
        self.log.append(f"+{role}")
        self.cluster.roles[f"w{len(self.cluster.roles)}"] = self.started[f"w{len(self.cluster.roles)}"] = role

    def remove_worker(self, role: str, address: str = "") -> None:
        """As LocalLauncher: the worker at `address` (names here are addresses), else the newest of `role`."""
        self.log.append(f"-{role}" + (f" {address}" if address else ""))
        name = address or [n for n, r in self.started.items() if r == role][-1]
        del self.cluster.roles[name], self.started[name]


def traffic(m: ServerMetrics, n: int, prompt: int, output: int, ttft: float = 0.2, tpot: float = 0.02) -> None:
    for _ in range(n):
        m.requests.labels("length").inc()
        m.prompt_tokens.inc(prompt)
        m.generation_tokens.inc(output)
        m.ttft.observe(ttft)
        m.tpot.observe(tpot)


def test_quantile_of_what_a_histogram_gained() -> None:
    prev = [(0.1, 5.0), (0.5, 5.0), (1.0, 5.0), (math.inf, 5.0)]
    cur = [(0.1, 5.0), (0.5, 15.0), (1.0, 25.0), (math.inf, 25.0)]  # +10 in (0.1, 0.5], +10 in (0.5, 1]
    assert quantile(0.5, prev, cur) == pytest.approx(0.5)
    assert quantile(0.9, prev, cur) == pytest.approx(0.5 + 0.5 * 0.8)
    assert quantile(0.9, cur, cur) is None


def test_observation_from_two_scrapes() -> None:
    m = ServerMetrics(lambda: {})
    a = snapshot(m.registry)
    traffic(m, 30, prompt=100, output=50, ttft=0.3)
    o = observe(a, snapshot(m.registry), now=10.0, interval_s=10.0, kv_usage=0.4,
                workers=[("p", "prefill", {"busy_fraction": 0.2, "num_requests_waiting": 3}),
                         ("d", "decode", {"busy_fraction": 0.6})])
    assert (o.requests, o.rate, o.prompt_tokens, o.output_tokens) == (30, 3.0, 100.0, 50.0)
    assert 0.25 < o.ttft_s <= 0.5 and 0.015 < o.tpot_s <= 0.025  # p90 within the observed value's bucket
    assert o.counts == {"prefill": 1, "decode": 1, "colocated": 0}
    assert o.busy == {"prefill": 0.2, "decode": 0.6} and o.queued["prefill"] == 3 and o.kv_usage == 0.4


def test_moves_switch_least_loaded_first_decode_before_prefill() -> None:
    ws = [("a", "colocated", 3.0), ("b", "colocated", 0.0), ("c", "colocated", 1.0), ("d", "colocated", 2.0)]
    out, rest = moves(ws, Split(2, 2))
    assert out == [("b", "decode"), ("c", "prefill"), ("d", "decode"), ("a", "prefill")] and rest == {}
    out, rest = moves([("a", "prefill", 0.0), ("b", "decode", 0.0)], Split(3, 2))
    assert out == [] and rest == {"prefill": 2, "decode": 1}
    out, rest = moves([("a", "prefill", 0.0), ("b", "prefill", 1.0), ("c", "decode", 0.0)], Split(1, 1))
    assert out == [] and rest == {"prefill": -1}


def _loop(cluster: Cluster, m: ServerMetrics, clock: list[float], elastic: bool = False,
          launcher: Launcher | None = None, cooldown_s: float = 0.0) -> PlannerLoop:
    s = PlannerSettings(slo_ttft_s=1.0, slo_tpot_s=0.05, predictor="constant", cooldown_s=cooldown_s, hysteresis=0.1,
                        elastic=elastic, max_total=8, max_utilization=1.0)
    return PlannerLoop(SlaPlanner(Capacity(), s), m.registry, 10.0, cluster.workers, lambda: 0.3, cluster.switch,
                       launcher, clock=lambda: clock[0])


def test_loop_switches_roles_to_the_traffic_and_exports_metrics() -> None:
    cluster, m, clock = Cluster(["prefill", "decode", "decode", "decode"]), ServerMetrics(lambda: {}), [0.0]
    loop = _loop(cluster, m, clock)
    clock[0] = 10.0
    traffic(m, 40, prompt=2000, output=100)  # 4 req/s x 2000 = 2 prefill; 0.2 decode: prefill-bound
    d = asyncio.run(loop.step())
    assert d.changed and d.wanted == Split(3, 1)
    assert sorted(cluster.roles.values()) == ["decode", "prefill", "prefill", "prefill"]
    assert len(cluster.calls) == 2 and cluster.calls[0][0] == "w1"  # the least loaded decode worker first
    text = generate_latest(m.registry).decode()
    assert 'pdserve:planner_workers{kind="wanted",role="prefill"} 3.0' in text
    assert 'pdserve:planner_decisions_total{changed="true"} 1.0' in text
    assert "pdserve:planner_predicted_rate 4.0" in text
    assert 'pdserve:planner_correction_factor{factor="ttft_disagg"}' in text
    assert 'pdserve:planner_actions_total{action="switch",outcome="ok"} 2.0' in text
    clock[0] = 20.0
    traffic(m, 40, prompt=100, output=1000)  # now decode-bound: 4 x 1000 / 2000 = 2 decode
    d = asyncio.run(loop.step())
    assert d.wanted == Split(1, 3) and sorted(cluster.roles.values()) == ["decode", "decode", "decode", "prefill"]


def test_loop_adds_and_removes_through_the_launcher_when_elastic() -> None:
    cluster, m, clock = Cluster(["prefill", "decode"]), ServerMetrics(lambda: {}), [0.0]
    launcher = Launcher(cluster)
    loop = _loop(cluster, m, clock, elastic=True, launcher=launcher)
    clock[0] = 10.0
    traffic(m, 60, prompt=2000, output=100)  # 6 req/s: 3 prefill
    assert asyncio.run(loop.step()).wanted == Split(3, 1)
    assert launcher.log == ["+prefill", "+prefill"] and cluster.calls == []
    clock[0] = 20.0
    traffic(m, 10, prompt=2000, output=100)  # 1 req/s: 1 prefill
    asyncio.run(loop.step())
    assert launcher.log[2:] == ["-prefill w0", "-prefill w2"]  # by address, least loaded first


def test_elastic_removal_among_equally_loaded_workers_takes_the_newest() -> None:
    # idle workers all: the one the planner added goes, not one the cluster was started with
    cluster, m, clock = Cluster(["prefill", "decode", "prefill"]), ServerMetrics(lambda: {}), [0.0]
    cluster.inflight = dict.fromkeys(cluster.roles, 0.0)
    launcher = Launcher(cluster)
    loop = _loop(cluster, m, clock, elastic=True, launcher=launcher)
    clock[0] = 10.0
    traffic(m, 10, prompt=2000, output=100)  # 1 req/s: 1 prefill
    assert asyncio.run(loop.step()).wanted == Split(1, 1)
    assert launcher.log == ["-prefill w2"]


def test_the_cool_down_counts_from_when_an_added_worker_is_up_not_from_the_decision() -> None:
    # A worker that takes longer to start than the cool-down (weights loading) must not be removed
    # the moment it is up by an idle interval: the change took effect when it joined.
    cluster, m, clock = Cluster(["prefill", "decode"]), ServerMetrics(lambda: {}), [0.0]
    launcher = Launcher(cluster)
    add = launcher.add_worker

    def slow_add(role: str) -> None:
        clock[0] += 100.0
        add(role)

    launcher.add_worker = slow_add  # type: ignore[method-assign]
    loop = _loop(cluster, m, clock, elastic=True, launcher=launcher, cooldown_s=30.0)
    clock[0] = 10.0
    traffic(m, 40, prompt=2000, output=100)  # 4 req/s: 2 prefill
    assert asyncio.run(loop.step()).wanted == Split(2, 1) and clock[0] == 110.0
    clock[0] = 120.0  # 1 req/s: 1P1D would do, but the new worker joined 10 s ago
    traffic(m, 10, prompt=2000, output=100)
    d = asyncio.run(loop.step())
    assert not d.changed and "cool-down" in d.reason and launcher.log == ["+prefill"]
    clock[0] = 150.0  # 40 s after it joined: past the cool-down
    traffic(m, 30, prompt=2000, output=100)
    assert asyncio.run(loop.step()).wanted == Split(1, 1) and launcher.log == ["+prefill", "-prefill w0"]


def test_elastic_removal_takes_a_worker_serving_the_role_now_not_the_one_it_started_in() -> None:
    # w3 started as decode and was switched to prefill: the launcher still lists it as decode, so
    # "stop the newest decode worker" would stop a prefill one and leave 1P2D.
    cluster, m, clock = Cluster(["prefill", "decode", "decode", "decode"]), ServerMetrics(lambda: {}), [0.0]
    launcher = Launcher(cluster)
    cluster.roles["w3"] = "prefill"
    loop = _loop(cluster, m, clock, elastic=True, launcher=launcher)
    clock[0] = 10.0
    traffic(m, 40, prompt=2000, output=100)  # 4 req/s: 2 prefill, 1 decode
    assert asyncio.run(loop.step()).wanted == Split(2, 1)
    assert launcher.log == ["-decode w1"]  # a decode worker now, the least loaded
    assert sorted(cluster.roles.values()) == ["decode", "prefill", "prefill"]


def test_the_interval_after_a_change_starts_once_the_switches_are_done() -> None:
    cluster, m, clock = Cluster(["prefill", "decode", "decode", "decode"]), ServerMetrics(lambda: {}), [0.0]
    switch = cluster.switch

    async def slow_switch(name: str, role: str) -> None:  # requests finish, slowly, while it switches
        traffic(m, 5, prompt=2000, output=100, ttft=30.0)
        clock[0] += 5.0
        await switch(name, role)

    loop = _loop(cluster, m, clock)
    loop.switch = slow_switch
    clock[0] = 10.0
    traffic(m, 40, prompt=2000, output=100)
    assert asyncio.run(loop.step()).changed and clock[0] == 20.0
    clock[0] = 30.0
    traffic(m, 40, prompt=2000, output=100)
    o = asyncio.run(loop.step()).observation
    assert o.interval_s == 10.0 and o.requests == 40 and o.ttft_s < 1.0  # not the 10 that finished mid-switch


def test_a_failed_action_is_counted_and_the_loop_goes_on() -> None:
    cluster, m, clock = Cluster(["prefill", "decode", "decode", "decode"]), ServerMetrics(lambda: {}), [0.0]

    async def broken(name: str, role: str) -> None:
        raise RuntimeError("worker unreachable")

    loop = _loop(cluster, m, clock)
    loop.switch = broken
    clock[0] = 10.0
    traffic(m, 40, prompt=2000, output=100)
    asyncio.run(loop.step())
    assert 'pdserve:planner_actions_total{action="switch",outcome="error"} 2.0' in generate_latest(m.registry).decode()


def test_no_switch_role_is_a_clear_error() -> None:
    class OldBackend:
        pass

    with pytest.raises(ConfigError, match="switch_role"):
        require_switch(OldBackend)


def test_up_with_a_missing_planner_profile_fails_before_any_worker_starts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`pdserve up` builds the planner's performance model (sim/capacity.py) before it starts
    anything, and hands it to the launch layer."""
    missing = tmp_path / "no-profile.json"
    r = subprocess.run([sys.executable, "-m", "pdserve.cli", "up", "--planner", "sla", "--planner-profile",
                        str(missing), "--port", "0", "--prefill", "1", "--decode", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"pdserve up: No such file or directory: {missing}"
    assert "starting" not in r.stdout, r.stdout


def test_run_cluster_with_the_planner_needs_its_performance_model() -> None:
    from pdserve.config.load import cluster_from_dict
    from pdserve.launch.serving import run_cluster

    with pytest.raises(ConfigError, match="performance model"):
        run_cluster(cluster_from_dict({"planner": {"mode": "sla"}}))


class Router:
    """A router backend's planner-facing calls: its pools change only when told (add_worker /
    remove_worker, as `pdserve up`'s launcher follower tells it, every half second)."""

    def __init__(self, roles: list[str]) -> None:
        self.pools = {f"127.0.0.1:{i}": r for i, r in enumerate(roles)}

    def worker_stats(self) -> list[tuple[str, str, dict[str, float]]]:
        return [(f"{r}@{a}", r, {"inflight": 0.0}) for a, r in self.pools.items()]

    def stats(self) -> dict[str, float]:
        return {"kv_cache_usage": 0.0}

    async def switch_role(self, name: str, role: str) -> None:
        self.pools[address_of(name)] = role

    async def add_worker(self, role: str, address: str) -> str:
        self.pools.setdefault(address, role)
        return f"{role}@{address}"

    async def remove_worker(self, address: str) -> bool:
        return self.pools.pop(address, None) is not None


class SlowFollowedLauncher:
    """Starts and stops workers, which the router learns of only at the follower's next round
    (which, here, never comes)."""

    def __init__(self, n: int) -> None:
        self.n, self.log = n, []  # type: ignore[var-annotated]

    def add_worker(self, role: str) -> WorkerHandle:
        self.log.append(f"+{role}")
        self.n += 1
        return WorkerHandle(role, self.n, f"127.0.0.1:{self.n}", 0)

    def remove_worker(self, role: str, address: str = "") -> WorkerHandle:
        self.log.append(f"-{role} {address}")
        return WorkerHandle(role, 0, address, 0)


def test_the_router_counts_a_worker_the_planner_added_or_removed_at_its_next_interval() -> None:
    # Without it, the next interval still sees the old pools (the launcher follower lags) and adds
    # the same workers again, past max_workers, or finds a removed worker still there.
    from pdserve.config.load import cluster_from_dict
    from pdserve.serve.planner_loop import from_config

    cfg = cluster_from_dict({"prefill": {"workers": 1}, "decode": {"workers": 1}, "planner": {
        "mode": "sla", "elastic": True, "max_workers": 4, "predictor": "constant", "cooldown_s": 0.0,
        "slo_ttft_ms": 1000, "slo_tpot_ms": 50, "max_utilization": 1.0}})
    router, launcher, m, clock = Router(["prefill", "decode"]), SlowFollowedLauncher(1), ServerMetrics(lambda: {}), [0.0]
    loop = from_config(cfg, router, m.registry, Capacity(), launcher, clock=lambda: clock[0])
    for t in (10.0, 20.0):
        clock[0] = t
        traffic(m, 40, prompt=2000, output=100)  # 4 req/s: 2 prefill
        asyncio.run(loop.step())
    assert launcher.log == ["+prefill"] and sorted(router.pools.values()) == ["decode", "prefill", "prefill"]
    clock[0] = 30.0
    traffic(m, 10, prompt=2000, output=100)  # 1 req/s: 1 prefill
    asyncio.run(loop.step())
    assert launcher.log[1:] == ["-prefill 127.0.0.1:2"] and "127.0.0.1:2" not in router.pools
