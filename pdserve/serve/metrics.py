"""Prometheus metrics for the front (router or standalone worker), one registry per server.

The router's /metrics holds its own request metrics, gauges per worker from the heartbeats, and
every worker's own counters and histograms (`serve/telemetry.py`: step times, KV transfers, prefix
cache), re-exported with the worker's name added. README "Monitoring" lists them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric

from pdserve.serve.messages import MetricFamily

WorkerMetrics = Callable[[], list[tuple[str, str, list[MetricFamily]]]]

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.5, 0.75, 1.0, 2.5)
PHASES = ("router_queue", "queue", "prefill_queue", "prefill", "transfer", "decode")


class ServerMetrics:
    """Latency histograms, token counters and gauges read from the backend at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, float]],
                 worker_stats: Callable[[], list[tuple[str, str, dict[str, float]]]] | None = None,
                 link_stats: Callable[[], list[tuple[str, str, float]]] | None = None,
                 worker_metrics: WorkerMetrics | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pdserve:time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.itl = Histogram("pdserve:inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.phase = Histogram("pdserve:request_phase_seconds", "Per-request time in each phase",
                               ["phase"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("pdserve:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.errors = Counter("pdserve:request_errors", "Requests answered with an error", ["status"],
                              registry=r)
        self._gauges = {
            name: Gauge(f"pdserve:{name}", help_, registry=r)
            for name, help_ in [
                ("num_requests_running", "Requests being computed"),
                ("num_requests_waiting", "Requests queued"),
                ("kv_cache_usage", "Fraction of KV blocks in use (0-1)"),
                ("kv_free_blocks", "Free KV blocks"),
                ("kv_total_blocks", "KV blocks in all"),
                ("busy_fraction", "Share of wall time spent computing"),
                ("router_queue_requests", "Requests at the router not yet handed to a worker (routing, "
                                          "reserving KV, backing off)"),
            ]
        }
        self._stats = stats
        self._worker_stats = worker_stats
        self._worker_gauges = {
            name: Gauge(f"pdserve:worker_{name}", help_, ["worker", "role"], registry=r)
            for name, help_ in [
                ("up", "1 if the router can use the worker"),
                ("busy_fraction", "Share of the worker's wall time spent computing"),
                ("kv_free_blocks", "Free KV blocks on the worker"),
                ("inflight", "Requests the router has on the worker"),
                ("breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open"),
                ("num_requests_waiting", "Requests queued on the worker (prefill: the prefill queue)"),
                ("num_requests_running", "Requests being computed on the worker"),
                ("queued_prompt_tokens", "Prompt tokens in the worker's prefill queue"),
                ("kv_reservations", "KV reservations held on the worker (decode: waiting for their KV)"),
                ("kv_transfers_in_flight", "KV transfers in flight (prefill: sending, decode: awaited)"),
                ("kv_cache_usage", "Fraction of the worker's KV blocks in use (0-1)"),
            ]
        }
        self._link_gauge = Gauge("pdserve:link_breaker_state",
                                 "Circuit breaker of a (prefill, decode) link: 0 closed, 1 half-open, 2 open",
                                 ["prefill", "decode"], registry=r)
        self._link_stats = link_stats
        if worker_metrics is not None:
            r.register(WorkerFamilies(worker_metrics))

    def observe_phases(self, timings: dict[str, float]) -> None:
        for phase, seconds in timings.items():
            if phase in PHASES and seconds >= 0:
                self.phase.labels(phase).observe(seconds)

    def render(self) -> bytes:
        for name, value in self._stats().items():
            if name in self._gauges:
                self._gauges[name].set(value)
        if self._worker_stats is not None:
            for gauge in self._worker_gauges.values():
                gauge.clear()  # a worker that left the router (removed, restarted elsewhere) leaves /metrics
            for worker, role, values in self._worker_stats():
                for name, value in values.items():
                    if name in self._worker_gauges:
                        self._worker_gauges[name].labels(worker, role).set(value)
        if self._link_stats is not None:
            for prefill, decode, state in self._link_stats():
                self._link_gauge.labels(prefill, decode).set(state)
        return generate_latest(self.registry)


class WorkerFamilies:
    """A collector: the workers' own families, merged by name, each sample with its worker named."""

    def __init__(self, source: WorkerMetrics) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families are only known once workers report them

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for worker, role, families in self.source():
            for fam in families:
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.help, fam.kind)
                for smp in fam.samples:
                    out.add_sample(smp.name, {fam.self_label: worker, "role": role, **smp.labels}, smp.value)
        yield from merged.values()
