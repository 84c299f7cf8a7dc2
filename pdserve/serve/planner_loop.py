"""The online planner in a running cluster: every interval, observe -> decide -> act.

Observe: what the router's /metrics already counts (serve/metrics.py: the TTFT and TPOT histograms,
finished requests, prompt and generated tokens; differences between two scrapes of the registry,
p90 from the histogram buckets as Prometheus' histogram_quantile computes it), and the workers'
heartbeats (roles, busy fractions, queues, KV usage). Decide: `sched/sla_planner.py`. Act through
two callables: `switch(name, role)` (the router backend's `switch_role`: the worker drains its
old role's work and rejoins in the new one) and, with a launcher, `add_worker(role)` /
`remove_worker(role)` for the workers no switch can supply or that are left over.
Every decision is logged with its inputs and exported as `pdserve:planner_*` on the same registry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from pdserve.sched.sla_planner import ROLES, Decision, Observation, SlaPlanner, Split

log = logging.getLogger("pdserve.planner")

TTFT = "pdserve:time_to_first_token_seconds"
TPOT = "pdserve:time_per_output_token_seconds"


@dataclass
class Snapshot:
    """Cumulative counts read from the front's registry at one moment."""

    requests: float = 0.0
    prompt_tokens: float = 0.0
    output_tokens: float = 0.0
    buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # histogram -> (le, count)


def snapshot(registry: CollectorRegistry) -> Snapshot:
    s = Snapshot()
    for fam in registry.collect():
        for smp in fam.samples:
            if smp.name == "pdserve:request_success_total":
                s.requests += smp.value
            elif smp.name == "pdserve:prompt_tokens_total":
                s.prompt_tokens += smp.value
            elif smp.name == "pdserve:generation_tokens_total":
                s.output_tokens += smp.value
            elif smp.name in (TTFT + "_bucket", TPOT + "_bucket"):
                s.buckets.setdefault(smp.name[: -len("_bucket")], []).append((float(smp.labels["le"]), smp.value))
    return s


def quantile(q: float, prev: list[tuple[float, float]], cur: list[tuple[float, float]]) -> float | None:
    """The q-quantile of what a histogram gained between two snapshots (linear within a bucket, as
    Prometheus' histogram_quantile); None if it gained nothing."""
    before = dict(prev)
    gained = sorted((le, n - before.get(le, 0.0)) for le, n in cur)
    if not gained or gained[-1][1] <= 0:
        return None
    rank = q * gained[-1][1]
    lo_le, lo_n = 0.0, 0.0
    for le, n in gained:
        if n >= rank:
            if math.isinf(le):
                return lo_le  # in the open top bucket: its lower bound, as Prometheus does
            return lo_le + (le - lo_le) * ((rank - lo_n) / (n - lo_n) if n > lo_n else 1.0)
        lo_le, lo_n = le, n
    return lo_le


def observe(prev: Snapshot, cur: Snapshot, now: float, interval_s: float,
            workers: list[tuple[str, str, dict[str, float]]], kv_usage: float, q: float = 0.9) -> Observation:
    """The interval between two snapshots, with the workers as they are now."""
    n = max(0.0, cur.requests - prev.requests)
    counts = {r: 0 for r in ROLES}
    busy: dict[str, list[float]] = {r: [] for r in ROLES}
    queued = {r: 0.0 for r in ROLES}
    for _, role, stats in workers:
        if role in counts:
            counts[role] += 1
            busy[role].append(stats.get("busy_fraction", 0.0))
            queued[role] += stats.get("num_requests_waiting", 0.0)
    return Observation(
        time_s=now, interval_s=interval_s, requests=int(n),
        prompt_tokens=(cur.prompt_tokens - prev.prompt_tokens) / n if n else 0.0,
        output_tokens=(cur.output_tokens - prev.output_tokens) / n if n else 0.0,
        ttft_s=quantile(q, prev.buckets.get(TTFT, []), cur.buckets.get(TTFT, [])),
        tpot_s=quantile(q, prev.buckets.get(TPOT, []), cur.buckets.get(TPOT, [])),
        counts=counts, queued=queued, busy={r: sum(v) / len(v) for r, v in busy.items() if v}, kv_usage=kv_usage)


def moves(workers: list[tuple[str, str, float]], wanted: Split) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """From (name, role, load) per worker to the wanted split: the switches (name, new role), the
    least-loaded worker of a surplus role first, and what is still missing (+) or left over (-) per
    role for a launcher. Switches alternate between the roles that need workers, decode first, so
    every step on the way can serve (a prefill worker needs a decode worker to send KV to)."""
    have = {r: sorted((w for w in workers if w[1] == r), key=lambda w: w[2]) for r in ROLES}
    diff = {r: getattr(wanted, r) - len(have[r]) for r in ROLES}
    spare = [(w[0], r) for r in ROLES if diff[r] < 0 for w in have[r][: -diff[r]]]
    need = {r: diff[r] for r in ROLES if diff[r] > 0}
    out: list[tuple[str, str]] = []
    while spare and any(need.values()):
        for role in ("decode", "colocated", "prefill"):
            if need.get(role, 0) > 0 and spare:
                out.append((spare.pop(0)[0], role))
                need[role] -= 1
    rest = {r: n for r, n in need.items() if n > 0}
    for _, r in spare:
        rest[r] = rest.get(r, 0) - 1
    return out, rest


class PlannerMetrics:
    """`pdserve:planner_*` on the front's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.decisions = Counter("pdserve:planner_decisions", "Planner decisions", ["changed"], registry=r)
        self.actions = Counter("pdserve:planner_actions", "Planner actions on workers", ["action", "outcome"],
                               registry=r)
        self.workers = Gauge("pdserve:planner_workers", "Workers per role: wanted by the planner, and current",
                             ["role", "kind"], registry=r)
        self.need = Gauge("pdserve:planner_need_instances",
                          "Instances per role the performance model asks for at the predicted load", ["role"], registry=r)
        self.rate = Gauge("pdserve:planner_predicted_rate", "Predicted arrival rate of the next interval (req/s)",
                          registry=r)
        self.observed = Gauge("pdserve:planner_observed_rate", "Arrival rate of the last interval (req/s)", registry=r)
        self.lengths = Gauge("pdserve:planner_predicted_tokens", "Predicted mean tokens per request", ["kind"],
                             registry=r)
        self.corrections = Gauge("pdserve:planner_correction_factor",
                                 "Observed over modelled latency, per latency and mode", ["factor"], registry=r)

    def record(self, d: Decision) -> None:
        self.decisions.labels(str(d.changed).lower()).inc()
        for role in ROLES:
            self.workers.labels(role, "wanted").set(getattr(d.wanted, role))
            self.workers.labels(role, "current").set(getattr(d.current, role))
            x = d.need[role]
            self.need.labels(role).set(x if math.isfinite(x) else -1)
        self.rate.set(d.predicted.rate)
        self.observed.set(d.observation.rate)
        self.lengths.labels("prompt").set(d.predicted.prompt)
        self.lengths.labels("output").set(d.predicted.output)
        for k, v in d.corrections.items():
            self.corrections.labels(k).set(v)


Switch = Callable[[str, str], Awaitable[None]]


def address_of(name: str) -> str:
    """A worker's address from its router name (`Worker.name`: role it joined as, @, host:port)."""
    return name.rpartition("@")[2]


class PlannerLoop:
    """Runs the planner against one router backend.

    workers(): (name, role, heartbeat gauges) per worker (the backend's `worker_stats`);
    kv_usage(): the cluster's KV usage (backend.stats()); registry: the front's, read and written;
    launcher: add_worker / remove_worker (blocking; run in a thread), or None to switch only;
    join(role, address) / leave(address): put a worker the launcher started into the router's pools,
    take one it stopped out (the backend's add_worker / remove_worker), so the next interval counts
    what the planner did, whether or not the launcher follower has caught up."""

    def __init__(self, planner: SlaPlanner, registry: CollectorRegistry, interval_s: float,
                 workers: Callable[[], list[tuple[str, str, dict[str, float]]]], kv_usage: Callable[[], float],
                 switch: Switch, launcher: Any = None, clock: Callable[[], float] = time.monotonic,
                 join: Callable[[str, str], Awaitable[Any]] | None = None,
                 leave: Callable[[str], Awaitable[Any]] | None = None) -> None:
        self.planner = planner
        self.registry = registry
        self.interval_s = interval_s
        self.workers = workers
        self.kv_usage = kv_usage
        self.switch = switch
        self.launcher = launcher
        self.clock = clock
        self.join = join
        self.leave = leave
        self.metrics = PlannerMetrics(registry)
        self.decisions: list[Decision] = []
        self._prev = snapshot(registry)
        self._prev_t = clock()

    async def step(self) -> Decision:
        """One interval: observe since the last step, decide, act (returns once the actions are done)."""
        now = self.clock()
        cur = snapshot(self.registry)
        workers = self.workers()
        o = observe(self._prev, cur, now, max(1e-9, now - self._prev_t), workers, self.kv_usage())
        self._prev, self._prev_t = cur, now
        d = self.planner.observe(o)
        self.decisions.append(d)
        self.metrics.record(d)
        log.info("planner decision %s", json.dumps(d.as_dict(), default=str))
        if d.changed:
            await self.act(d.wanted, workers)
            # the next interval starts once the switches are done: what finished while workers
            # drained and rejoined is the switch's cost, not the new split's, and must not set
            # the new split's correction factors
            self._prev, self._prev_t = snapshot(self.registry), self.clock()
            self.planner.settled(self._prev_t)  # and so does the cool-down
        return d

    async def act(self, wanted: Split, workers: list[tuple[str, str, dict[str, float]]]) -> None:
        loads = [(name, role, stats.get("inflight", 0.0)) for name, role, stats in workers]
        switches, rest = moves(loads, wanted)
        for name, role in switches:
            await self._do("switch", f"{name} -> {role}", self.switch(name, role))
        if self.launcher is None:
            if rest:
                log.warning("planner: no launcher to add or remove workers %s", rest)
            return
        switched = {name for name, _ in switches}
        for role, n in rest.items():
            # the least-loaded workers serving as `role` now, by address: the launcher lists a
            # worker under the role it started it in, which a role switch has since changed;
            # among equally loaded ones the newest (the router lists them in joining order), so
            # an idle cluster shrinks back to the workers it was started with
            spare = [name for name, r, _ in sorted(reversed(loads), key=lambda w: w[2])
                     if r == role and name not in switched]
            for k in range(abs(n)):
                if n > 0:
                    await self._do("add", role, self._add(role))
                elif k < len(spare):
                    await self._do("remove", spare[k], self._remove(role, address_of(spare[k])))

    async def _add(self, role: str) -> None:
        handle = await asyncio.to_thread(self.launcher.add_worker, role)
        if self.join is not None and handle is not None:
            await self.join(handle.role, handle.address)

    async def _remove(self, role: str, address: str) -> None:
        await asyncio.to_thread(self.launcher.remove_worker, role, address)
        if self.leave is not None:
            await self.leave(address)

    async def _do(self, action: str, what: str, aw: Awaitable[Any]) -> None:
        try:
            await aw
        except Exception:  # one failed action must not stop the planner: the next interval re-plans
            self.metrics.actions.labels(action, "error").inc()
            log.exception("planner: %s %s failed", action, what)
            return
        self.metrics.actions.labels(action, "ok").inc()
        log.info("planner: %s %s", action, what)

    async def run(self) -> None:
        """Every interval_s, forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.step()
            except Exception:  # a bad interval must not end the router
                log.exception("planner step failed")


def require_switch(backend: Any) -> None:
    """The planner acts by switching roles: refuse to start without `switch_role` (class or instance)."""
    if getattr(backend, "switch_role", None) is None:
        from pdserve.config.schema import ConfigError

        raise ConfigError("planner: sla switches workers' roles, and this router has no ClusterBackend.switch_role "
                          "(runtime role switching is not in this build)")


def from_config(cfg: Any, backend: Any, registry: CollectorRegistry, capacity: Any,
                launcher: Any = None, clock: Callable[[], float] = time.monotonic) -> PlannerLoop:
    """The loop `pdserve up --planner sla` runs: the schema's `planner` section, the router backend's
    `switch_role`, the launcher for elastic add/remove."""
    from pdserve.sched.sla_planner import settings_from

    require_switch(backend)
    p = cfg.planner
    settings = settings_from(p, max_total=p.max_workers or cfg.num_workers, elastic=p.elastic and launcher is not None)
    return PlannerLoop(SlaPlanner(capacity, settings), registry, p.interval_s, backend.worker_stats,
                       lambda: backend.stats().get("kv_cache_usage", 0.0), backend.switch_role,
                       launcher if settings.elastic else None, clock=clock, join=backend.add_worker,
                       leave=backend.remove_worker)
