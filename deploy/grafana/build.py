"""Writes pdserve.json, the Grafana dashboard, from the panel list below.

`python deploy/grafana/build.py` regenerates it; tests/test_monitoring.py checks the committed file
is current and runs every panel's query against a real Prometheus scraping a real cluster.
Queries use Grafana's `$__rate_interval`; the SLO lines match deploy/prometheus/pdserve-alerts.yml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "pdserve.json"
R = "$__rate_interval"
TTFT_SLO_S, TPOT_SLO_S = 1.0, 0.1


def q(metric: str, quantile: float, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({quantile}, sum by ({labels}) (rate({metric}_bucket[{R}])))"


# (row, title, unit, [(expr, legend)])
PANELS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    ("Requests", "Request rate by finish reason", "reqps",
     [(f"sum by (finished_reason) (rate(pdserve:request_success_total[{R}]))", "{{finished_reason}}")]),
    ("Requests", "Errors by status", "reqps",
     [(f"sum by (status) (rate(pdserve:request_errors_total[{R}]))", "{{status}}")]),
    ("Requests", "Tokens per second", "short",
     [(f"sum(rate(pdserve:prompt_tokens_total[{R}]))", "prompt"),
      (f"sum(rate(pdserve:generation_tokens_total[{R}]))", "generated")]),
    ("Latency vs SLO", "TTFT percentiles (SLO 1 s)", "s",
     [(q("pdserve:time_to_first_token_seconds", p), f"p{int(p * 100)}") for p in (0.5, 0.9, 0.99)]
     + [(f"vector({TTFT_SLO_S})", "SLO")]),
    ("Latency vs SLO", "TPOT percentiles (SLO 100 ms)", "s",
     [(q("pdserve:time_per_output_token_seconds", p), f"p{int(p * 100)}") for p in (0.5, 0.9, 0.99)]
     + [(f"vector({TPOT_SLO_S})", "SLO")]),
    ("Latency vs SLO", "Inter-token latency percentiles", "s",
     [(q("pdserve:inter_token_latency_seconds", p), f"p{int(p * 100)}") for p in (0.5, 0.99)]),
    ("Latency vs SLO", "SLO attainment (5 m, from the recording rules)", "percentunit",
     [("1 - pdserve:ttft_slo_miss_ratio:rate5m", "TTFT"), ("1 - pdserve:tpot_slo_miss_ratio:rate5m", "TPOT")]),
    ("Latency vs SLO", "Mean time per phase (where a request's time goes)", "s",
     [(f"sum by (phase) (rate(pdserve:request_phase_seconds_sum[{R}])) "
       f"/ sum by (phase) (rate(pdserve:request_phase_seconds_count[{R}]))", "{{phase}}")]),
    ("Prefill vs decode", "Busy share by role", "percentunit",
     [("avg by (role) (pdserve:worker_busy_fraction)", "{{role}}")]),
    ("Prefill vs decode", "Queues by stage", "short",
     [("sum(pdserve:router_queue_requests)", "router queue"),
      ('sum(pdserve:worker_num_requests_waiting{role="prefill"})', "prefill queue (requests)"),
      ('sum(pdserve:worker_kv_reservations{role="decode"})', "reservations held"),
      ("sum(pdserve:worker_kv_transfers_in_flight)", "transfers in flight"),
      ('sum(pdserve:worker_num_requests_waiting{role="decode"})', "decode waiting"),
      ('sum(pdserve:worker_num_requests_running{role="decode"})', "decode running")]),
    ("Prefill vs decode", "Prefill queue (tokens): THE prefill bottleneck signal", "short",
     [('sum by (worker) (pdserve:worker_queued_prompt_tokens{role="prefill"})', "{{worker}}")]),
    ("Prefill vs decode", "Engine step time p90 by role", "s",
     [(q("pdserve:engine_step_seconds", 0.9, "role"), "{{role}}")]),
    ("KV transfer", "Achieved GB/s per link", "GBs",
     [(f"sum by (prefill, decode, transport) (rate(pdserve:kv_transfer_bytes_total[{R}])) / 1e9",
       "{{prefill}} -> {{decode}} ({{transport}})")]),
    ("KV transfer", "Transfer time p90 per link", "s",
     [(q("pdserve:kv_transfer_seconds", 0.9, "prefill, decode"), "{{prefill}} -> {{decode}}")]),
    ("KV transfer", "Transfer failures by reason", "short",
     [(f"sum by (reason) (rate(pdserve:kv_transfer_failures_total[{R}]))", "{{reason}}"),
      (f"sum(rate(pdserve:kv_reservations_expired_total[{R}]))", "expired reservations")]),
    ("KV transfer", "Share of each transfer overlapped with prefill compute", "percentunit",
     [(f"sum(rate(pdserve:kv_transfer_overlap_ratio_sum[{R}])) / sum(rate(pdserve:kv_transfer_overlap_ratio_count[{R}]))",
       "overlap")]),
    ("KV cache", "KV cache usage per worker", "percentunit",
     [("pdserve:worker_kv_cache_usage", "{{worker}}")]),
    ("KV cache", "Prefix cache hit rate", "percentunit",
     [(f"sum(rate(pdserve:prefix_cache_hits_total[{R}])) / sum(rate(pdserve:prefix_cache_queries_total[{R}]))",
       "hit rate")]),
    ("Health", "Workers up", "short", [("pdserve:worker_up", "{{worker}}")]),
    ("Health", "Circuit breakers (0 closed, 1 half-open, 2 open)", "short",
     [("pdserve:worker_breaker_state", "{{worker}}"), ("pdserve:link_breaker_state", "{{prefill}} -> {{decode}}")]),
]


def build() -> str:
    panels, y, row, x = [], 0, None, 0
    ds = {"type": "prometheus", "uid": "${datasource}"}
    for i, (r, title, unit, targets) in enumerate(PANELS):
        if r != row:
            if row is not None:
                y += 8
            panels.append({"type": "row", "title": r, "id": 1000 + i, "collapsed": False,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
            row, x, y = r, 0, y + 1
        elif x >= 24:
            x, y = 0, y + 8
        panels.append({
            "type": "timeseries", "title": title, "id": i + 1, "datasource": ds,
            "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"datasource": ds, "expr": e, "legendFormat": leg, "refId": chr(65 + j)}
                        for j, (e, leg) in enumerate(targets)],
        })
        x += 8
    dash = {
        "title": "pdserve", "uid": "pdserve", "schemaVersion": 39, "version": 1, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "tags": ["pdserve", "llm"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": panels,
    }
    return json.dumps(dash, indent=1) + "\n"


if __name__ == "__main__":
    OUT.write_text(build())
    sys.stdout.write(f"wrote {OUT}\n")
