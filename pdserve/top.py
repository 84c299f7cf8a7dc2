"""`pdserve top`: a live terminal view of a running cluster, read from the router's /metrics.

Per worker: role, up, busy share, queue, KV use, step-time percentiles; per (prefill, decode) link:
achieved GB/s, transfers, failures, overlap with prefill compute; and SLO attainment (TTFT, TPOT).
Rates and percentiles are over the last refresh interval (the first frame: since the router started).
The parsing and arithmetic (`Snapshot`, `frame`) are plain functions of two scrapes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]


@dataclass
class Snapshot:
    """One scrape: sample name -> [(labels, value)], and when it was taken."""

    at: float
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, at: float) -> Snapshot:
        from prometheus_client.parser import text_string_to_metric_families

        snap = cls(at)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                snap.samples.setdefault(s.name, []).append((dict(s.labels), s.value))
        return snap

    def get(self, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
        return [(lab, v) for lab, v in self.samples.get(name, []) if all(lab.get(k) == x for k, x in match.items())]

    def total(self, name: str, **match: str) -> float:
        return sum(v for _, v in self.get(name, **match))

    def by(self, name: str, key: str, **match: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for lab, v in self.get(name, **match):
            out[lab.get(key, "")] = out.get(lab.get(key, ""), 0.0) + v
        return out

    def buckets(self, name: str, **match: str) -> list[tuple[float, float]]:
        """Cumulative (upper bound, count) of a histogram, summed over the matching series."""
        acc: dict[float, float] = {}
        for lab, v in self.get(name + "_bucket", **match):
            le = float(lab["le"])
            acc[le] = acc.get(le, 0.0) + v
        return sorted(acc.items())


def delta_buckets(now: list[tuple[float, float]], before: list[tuple[float, float]] | None
                  ) -> list[tuple[float, float]]:
    if not before:
        return now
    old = dict(before)
    return [(le, max(0.0, c - old.get(le, 0.0))) for le, c in now]


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative buckets; NaN without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lo_le, lo_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return lo_le
            return lo_le + (le - lo_le) * ((rank - lo_c) / (c - lo_c) if c > lo_c else 1.0)
        lo_le, lo_c = le, c
    return lo_le


def fraction_within(limit: float, buckets: list[tuple[float, float]]) -> float:
    """Share of observations at or under `limit` (linear within a bucket); NaN without any."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    lo_le, lo_c = 0.0, 0.0
    for le, c in buckets:
        if limit <= le:
            if math.isinf(le):
                return lo_c / buckets[-1][1]
            return (lo_c + (c - lo_c) * (limit - lo_le) / (le - lo_le if le > lo_le else 1.0)) / buckets[-1][1]
        lo_le, lo_c = le, c
    return 1.0


def _ms(s: float) -> str:
    return "-" if math.isnan(s) else f"{s * 1e3:.0f}ms"


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 100:.0f}%"


def _rate(now: Snapshot, before: Snapshot | None, name: str, **match: str) -> float:
    if before is None:
        return math.nan
    dt = max(1e-9, now.at - before.at)
    return max(0.0, now.total(name, **match) - before.total(name, **match)) / dt


def frame(now: Snapshot, before: Snapshot | None, ttft_slo_s: float, tpot_slo_s: float, url: str = "") -> list[str]:
    """The screen for one refresh, as lines."""
    prev = before
    lines = [f"pdserve top  {url}  {time.strftime('%H:%M:%S')}  "
             f"(rates over the last {now.at - prev.at:.1f}s)" if prev else f"pdserve top  {url}  (since start)"]
    ttft = delta_buckets(now.buckets("pdserve:time_to_first_token_seconds"),
                         prev.buckets("pdserve:time_to_first_token_seconds") if prev else None)
    tpot = delta_buckets(now.buckets("pdserve:time_per_output_token_seconds"),
                         prev.buckets("pdserve:time_per_output_token_seconds") if prev else None)
    rps = _rate(now, prev, "pdserve:e2e_request_latency_seconds_count")
    lines.append(f"requests: {'-' if math.isnan(rps) else f'{rps:.1f}/s'}  running "
                 f"{now.total('pdserve:num_requests_running'):.0f}  router queue "
                 f"{now.total('pdserve:router_queue_requests'):.0f}  errors "
                 f"{now.total('pdserve:request_errors_total'):.0f}")
    lines.append(f"SLO  TTFT<={ttft_slo_s * 1e3:.0f}ms: {_pct(fraction_within(ttft_slo_s, ttft))} "
                 f"(p50 {_ms(quantile(0.5, ttft))} p99 {_ms(quantile(0.99, ttft))})   "
                 f"TPOT<={tpot_slo_s * 1e3:.0f}ms: {_pct(fraction_within(tpot_slo_s, tpot))} "
                 f"(p50 {_ms(quantile(0.5, tpot))} p99 {_ms(quantile(0.99, tpot))})")
    lines.append("")
    head = f"{'WORKER':<28} {'ROLE':<9} {'UP':<3} {'BUSY':>5} {'WAIT':>5} {'RUN':>4} {'QTOK':>6} " \
           f"{'KV':>5} {'RSV':>4} {'XFER':>4} {'STEP p50':>9} {'p90':>7}"
    lines.append(head)
    switched = False
    for lab, up in sorted(now.get("pdserve:worker_up"), key=lambda x: (x[0].get("role", ""), x[0]["worker"])):
        w = lab["worker"]
        role = lab.get("role", "")
        # the name is the worker's id, made from the role it joined as: mark one serving another now
        if "@" in w and w.split("@", 1)[0] != role:
            role, switched = f"{role}*", True

        def g(name: str, w: str = w) -> float:
            return now.total(f"pdserve:worker_{name}", worker=w)

        steps = delta_buckets(now.buckets("pdserve:engine_step_seconds", worker=w),
                              prev.buckets("pdserve:engine_step_seconds", worker=w) if prev else None)
        lines.append(f"{w[:28]:<28} {role:<9} {'yes' if up else 'NO':<3} "
                     f"{_pct(g('busy_fraction')):>5} {g('num_requests_waiting'):>5.0f} "
                     f"{g('num_requests_running'):>4.0f} {g('queued_prompt_tokens'):>6.0f} "
                     f"{_pct(g('kv_cache_usage')):>5} {g('kv_reservations'):>4.0f} "
                     f"{g('kv_transfers_in_flight'):>4.0f} {_ms(quantile(0.5, steps)):>9} "
                     f"{_ms(quantile(0.9, steps)):>7}")
    if switched:
        lines.append("* switched: serves this role now; the name (a stable id) keeps the role it joined as")
    lines.append("")
    lines.append(f"{'LINK (prefill -> decode)':<50} {'TRANSPORT':<9} {'GB/s':>7} {'XFER/s':>7} "
                 f"{'MEAN':>7} {'OVERLAP':>7} {'FAILED':>6}  BREAKER")
    breakers = {(lab.get("prefill"), lab.get("decode")): v for lab, v in now.get("pdserve:link_breaker_state")}
    for lab, _ in now.get("pdserve:kv_transfer_bytes_total"):
        key = {k: lab[k] for k in ("prefill", "decode", "transport")}
        gbs = _rate(now, prev, "pdserve:kv_transfer_bytes_total", **key) / 1e9
        xps = _rate(now, prev, "pdserve:kv_transfer_seconds_count", **key)
        secs = now.total("pdserve:kv_transfer_seconds_sum", **key) - (
            prev.total("pdserve:kv_transfer_seconds_sum", **key) if prev else 0.0)
        count = now.total("pdserve:kv_transfer_seconds_count", **key) - (
            prev.total("pdserve:kv_transfer_seconds_count", **key) if prev else 0.0)
        osum = now.total("pdserve:kv_transfer_overlap_ratio_sum", **key) - (
            prev.total("pdserve:kv_transfer_overlap_ratio_sum", **key) if prev else 0.0)
        failed = now.total("pdserve:kv_transfer_failures_total", **key)
        state = {0.0: "closed", 1.0: "half-open", 2.0: "OPEN"}.get(breakers.get((key["prefill"], key["decode"]), 0.0),
                                                                   "?")
        name = f"{_short(key['prefill'])} -> {_short(key['decode'])}"
        lines.append(f"{name[:50]:<50} {key['transport']:<9} "
                     f"{'-' if math.isnan(gbs) else f'{gbs:.3f}':>7} {'-' if math.isnan(xps) else f'{xps:.1f}':>7} "
                     f"{_ms(secs / count if count else math.nan):>7} {_pct(osum / count if count else math.nan):>7} "
                     f"{failed:>6.0f}  {state}")
    return lines


def _short(worker: str) -> str:
    return worker.split("@", 1)[-1] if "@" in worker else worker


def _scrape(url: str) -> Snapshot:
    import httpx

    r = httpx.get(url.rstrip("/") + "/metrics", timeout=5, trust_env=False)
    r.raise_for_status()
    return Snapshot.parse(r.text, time.monotonic())


def run(url: str, interval: float, once: bool, ttft_slo_s: float, tpot_slo_s: float, out=sys.stdout, frames: Iterable[int] | None = None) -> int:  # type: ignore[no-untyped-def]
    """Redraw every `interval` seconds until interrupted (or print one frame with `once`)."""
    before: Snapshot | None = None
    for _ in frames if frames is not None else iter(int, 1):
        try:
            now = _scrape(url)
            lines = frame(now, before, ttft_slo_s, tpot_slo_s, url)
            before = now
        except Exception as e:  # noqa: BLE001 - a router restarting: say so and keep trying
            lines = [f"pdserve top  {url}", f"cannot read {url}/metrics: {e}"]
            if once:
                print("\n".join(lines), file=sys.stderr)
                return 1
        if once:
            out.write("\n".join(lines) + "\n")
            return 0
        out.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
        out.flush()
        time.sleep(interval)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("top", help="live view of a running cluster from its router's /metrics")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the router's base URL")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0, help="TTFT SLO for the attainment figure")
    p.add_argument("--tpot-slo-ms", type=float, default=100.0, help="TPOT SLO for the attainment figure")

    def main(args: argparse.Namespace) -> int:
        try:
            return run(args.url, args.interval, args.once, args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)
        except KeyboardInterrupt:
            return 0

    p.set_defaults(func=main)
