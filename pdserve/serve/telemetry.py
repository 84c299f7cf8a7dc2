"""A worker's own metrics: cumulative counters and histograms it records and reports to the router.

Workers have no HTTP server; each heartbeat's `Stats` carries `WorkerTelemetry.families()` (the
registry's samples as plain data), and the router's /metrics re-exports them with the worker's
name added (`serve/metrics.py`). Recording is thread-safe (the engine thread observes step times,
the event loop transfer outcomes).

Transfer metrics are recorded by the prefill (sending) side, labelled by the decode worker and the
transport; the router adds the prefill worker's name as `prefill`, so every series names its pair.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from pdserve.serve import messages as m

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                2.5, 5.0, 10.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATIO_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
FAILURE_REASONS = ("checksum", "cut", "timeout", "refused", "aborted", "other")
PAIR = ["decode", "transport"]


def failure_reason(error: str) -> str:
    """The reason label of a failed transfer, from the sender's error text."""
    e = error.lower()
    if "checksum" in e or "authentication" in e or "digest" in e:
        return "checksum"
    if "not expected" in e or "not reserved" in e or "expired" in e:
        return "refused"
    if "no progress" in e or "timed out" in e or "stayed full" in e:
        return "timeout"
    if "aborted" in e or "sender closed" in e:
        return "aborted"
    if "connection" in e or "send failed" in e or "reset" in e or "broken pipe" in e:
        return "cut"
    return "other"


def overlap_share(transfer_start: float, transfer_end: float, compute_end: float) -> float:
    """Share of [transfer_start, transfer_end] during which prefill was still computing (0-1)."""
    span = transfer_end - transfer_start
    if span <= 0:
        return 1.0
    return min(1.0, max(0.0, (compute_end - transfer_start) / span))


class WorkerTelemetry:
    """The counters and histograms of one worker process."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.step = Histogram("pdserve:engine_step_seconds", "Duration of one engine step (prefill batch or "
                              "decode step) on the worker", buckets=STEP_BUCKETS, registry=r)
        self.step_tokens = Counter("pdserve:engine_step_tokens", "Tokens computed by engine steps", registry=r)
        self.transfer_bytes = Counter("pdserve:kv_transfer_bytes", "KV bytes of completed transfers", PAIR,
                                      registry=r)
        self.transfer_seconds = Histogram("pdserve:kv_transfer_seconds", "KV transfer time, first chunk queued "
                                          "to the last acknowledged", PAIR, buckets=TRANSFER_BUCKETS, registry=r)
        self.transfer_chunks = Counter("pdserve:kv_transfer_chunks", "KV chunks sent", PAIR, registry=r)
        self.transfer_failures = Counter("pdserve:kv_transfer_failures", "Failed KV transfers by reason",
                                         PAIR + ["reason"], registry=r)
        self.transfer_overlap = Histogram("pdserve:kv_transfer_overlap_ratio", "Share of each transfer that "
                                          "overlapped prefill compute", PAIR, buckets=RATIO_BUCKETS, registry=r)
        self.expired = Counter("pdserve:kv_reservations_expired", "KV reservations freed because their KV "
                               "never arrived", registry=r)
        self.cache_queries = Counter("pdserve:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                     "cache", registry=r)
        self.cache_hits = Counter("pdserve:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                  registry=r)

    def pair_seen(self, decode: str, transport: str) -> None:
        """Every failure reason of a pair exists from its first transfer on, at 0: rate() needs a start."""
        for reason in FAILURE_REASONS:
            self.transfer_failures.labels(decode, transport, reason)
        for fam in (self.transfer_bytes, self.transfer_chunks, self.transfer_seconds, self.transfer_overlap):
            fam.labels(decode, transport)

    def transfer_failed(self, decode: str, transport: str, error: str) -> None:
        self.transfer_failures.labels(decode, transport, failure_reason(error)).inc()

    def families(self) -> list[m.MetricFamily]:
        """Every metric as data for `Stats.metrics` (creation timestamps left out)."""
        out = []
        for fam in self.registry.collect():
            samples = [m.MetricSample(s.name, dict(s.labels), float(s.value))
                       for s in fam.samples if not s.name.endswith("_created")]
            self_label = "prefill" if fam.name.startswith("pdserve:kv_transfer") else "worker"
            out.append(m.MetricFamily(fam.name, fam.type, fam.documentation, samples, self_label))
        return out
