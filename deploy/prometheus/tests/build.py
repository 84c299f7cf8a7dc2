"""Writes pdserve-alerts_test.yml (promtool test rules) from the cases below.

The cases are written here, not in YAML, because promtool compares each firing alert's annotations
exactly: they are taken from the rules file itself (labels filled in), so editing an annotation
does not mean editing every test. `python deploy/prometheus/tests/build.py` regenerates the file;
tests/test_alert_rules.py fails while the committed file is stale, then runs promtool on it.

Every series is a counter sampled once a minute (promtool's `a+bxN`: starts at a, grows b a sample).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "pdserve-alerts.yml"
OUT = HERE / "pdserve-alerts_test.yml"
JOB = 'job="pdserve", instance="router:8000"'
P, D = "prefill@10.0.0.1:9000", "decode@10.0.0.2:9000"


def counter(name: str, labels: str, per_min: float, n: int) -> dict[str, str]:
    sel = f"{name}{{{JOB}{', ' + labels if labels else ''}}}"
    return {"series": sel, "values": f"0+{per_min:g}x{n}"}


def gauge(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f"{name}{{{JOB}{', ' + labels if labels else ''}}}", "values": values}


def latency(metric: str, le: str, total: float, good: float, seconds: float, n: int) -> list[dict[str, str]]:
    """A latency histogram: `total` requests a minute, `good` of them within bucket `le`."""
    return [counter(f"{metric}_bucket", f'le="{le}"', good, n),
            counter(f"{metric}_bucket", 'le="+Inf"', total, n),
            counter(f"{metric}_count", "", total, n),
            counter(f"{metric}_sum", "", seconds, n)]


def ttft(total: float, good: float, seconds: float, n: int) -> list[dict[str, str]]:
    return latency("pdserve:time_to_first_token_seconds", "1.0", total, good, seconds, n)


def tpot(total: float, good: float, n: int) -> list[dict[str, str]]:
    return latency("pdserve:time_per_output_token_seconds", "0.1", total, good, total * 0.05, n)


def phases(n: int, **seconds_per_min: float) -> list[dict[str, str]]:
    return [counter("pdserve:request_phase_seconds_sum", f'phase="{ph}"', s, n) for ph, s in seconds_per_min.items()]


def steps(role: str, fast: float, slow: float, n: int) -> list[dict[str, str]]:
    """Engine steps of a role: `fast` a minute take under 20 ms, `slow` a minute about 250 ms."""
    lab = f'worker="{role}@10.0.0.9:9000", role="{role}"'
    b = "pdserve:engine_step_seconds_bucket"
    return [counter(b, f'{lab}, le="0.02"', fast, n), counter(b, f'{lab}, le="0.04"', fast, n),
            counter(b, f'{lab}, le="0.06"', fast, n), counter(b, f'{lab}, le="0.3"', fast + slow, n),
            counter(b, f'{lab}, le="+Inf"', fast + slow, n)]


def transfers(ok: float, failed: float, reason: str, n: int) -> list[dict[str, str]]:
    pair = f'prefill="{P}", decode="{D}", role="prefill", transport="tcp"'
    return [counter("pdserve:kv_transfer_seconds_count", pair, ok, n),
            counter("pdserve:kv_transfer_failures_total", f'{pair}, reason="{reason}"', failed, n)]


def transfer_wait(total: float, slow: float, n: int) -> list[dict[str, str]]:
    b = "pdserve:request_phase_seconds_bucket"
    return [counter(b, 'phase="transfer", le="0.1"', total - slow, n),
            counter(b, 'phase="transfer", le="1.0"', total, n),
            counter(b, 'phase="transfer", le="+Inf"', total, n)]


def healthy(n: int, with_transfers: bool = True) -> list[dict[str, str]]:
    """A cluster meeting both SLOs: 60 requests a minute, TTFT 0.2 s of which prefill 0.15 s."""
    return (ttft(60, 60, 12, n) + tpot(60, 60, n) + phases(n, prefill_queue=3, prefill=6, router_queue=1)
            + steps("decode", 600, 0, n) + steps("prefill", 60, 0, n)
            + (transfers(60, 0, "cut", n) if with_transfers else []))


ALL = ["PrefillSlow", "DecodeSlow", "TransferSlowOrFailing", "KVCachePressure", "WorkerDown", "RouterDown",
       "CircuitOpen", "TTFTBudgetBurnFast", "TTFTBudgetBurnSlow", "TPOTBudgetBurnFast", "TPOTBudgetBurnSlow"]

# (what it shows, series, evaluated at, {alert: [extra labels of each firing instance]}); every
# alert of ALL not named there is checked NOT to fire at that time.
CASES: list[tuple[str, list[dict[str, str]], str, dict[str, list[dict[str, str]]]]] = [
    ("a healthy cluster raises nothing", healthy(70), "60m", {}),
    ("prefill slow (TTFT 3 s, 2.8 s of it prefill queue + compute): PrefillSlow, not DecodeSlow",
     ttft(60, 0, 180, 70) + tpot(60, 60, 70) + phases(70, prefill_queue=100, prefill=68, router_queue=1)
     + steps("decode", 600, 0, 70) + steps("prefill", 0, 60, 70),
     "10m", {"PrefillSlow": [{}], "TTFTBudgetBurnFast": [{}]}),
    ("prefill slow but not yet for 2 minutes: nothing fires", ttft(60, 0, 180, 70) + tpot(60, 60, 70)
     + phases(70, prefill_queue=100, prefill=68) + steps("decode", 600, 0, 70), "2m", {}),
    ("decode slow (steps 250 ms, TPOT missed): DecodeSlow, not PrefillSlow",
     ttft(60, 60, 12, 70) + tpot(60, 0, 70) + phases(70, prefill_queue=3, prefill=6, router_queue=1)
     + steps("decode", 0, 600, 70) + steps("prefill", 60, 0, 70),
     "10m", {"DecodeSlow": [{}], "TPOTBudgetBurnFast": [{}]}),
    ("decode queueing with fast steps is still DecodeSlow",
     ttft(60, 60, 12, 70) + tpot(60, 0, 70) + phases(70, prefill_queue=3, prefill=6) + steps("decode", 600, 0, 70)
     + [gauge("pdserve:worker_num_requests_waiting", f'worker="{D}", role="decode"', "5x70")],
     "10m", {"DecodeSlow": [{}], "TPOTBudgetBurnFast": [{}]}),
    ("TTFT missed while waiting at the router (decode full), not in prefill: no PrefillSlow; the burn "
     "alert and KVCachePressure fire",
     ttft(60, 0, 180, 70) + tpot(60, 60, 70) + phases(70, router_queue=170, prefill_queue=3, prefill=6)
     + steps("decode", 600, 0, 70)
     + [gauge("pdserve:worker_kv_cache_usage", f'worker="{D}", role="decode"', "0.97x70")],
     "10m", {"TTFTBudgetBurnFast": [{}], "KVCachePressure": [{"worker": D}]}),
    ("TPOT missed while decode steps are fast and nothing queues: no DecodeSlow, only the burn alert",
     ttft(60, 60, 12, 70) + tpot(60, 0, 70) + phases(70, prefill=6) + steps("decode", 600, 0, 70)
     + [gauge("pdserve:worker_num_requests_waiting", f'worker="{D}", role="decode"', "0x70")],
     "10m", {"TPOTBudgetBurnFast": [{}]}),
    ("a prefill worker's KV cache full is not decode pressure",
     healthy(70) + [gauge("pdserve:worker_kv_cache_usage", f'worker="{P}", role="prefill"', "0.99x70")], "10m", {}),
    ("slow TTFT burn (8% miss for 7 h): the slow burn alert, not the fast one",
     ttft(100, 92, 30, 430) + tpot(100, 100, 430) + phases(430, prefill=20) + steps("decode", 600, 0, 430),
     "420m", {"TTFTBudgetBurnSlow": [{}]}),
    ("slow TPOT burn (8% miss for 7 h): the slow burn alert, not the fast one",
     ttft(100, 100, 30, 430) + tpot(100, 92, 430) + phases(430, prefill=20) + steps("decode", 600, 0, 430),
     "420m", {"TPOTBudgetBurnSlow": [{}]}),
    ("10% of transfers cut: TransferSlowOrFailing on that link",
     healthy(70, False) + transfers(54, 6, "timeout", 70), "10m",
     {"TransferSlowOrFailing": [{"prefill": P, "decode": D, "transport": "tcp"}]}),
    ("1% of transfers failing is within tolerance", healthy(70, False) + transfers(594, 6, "checksum", 70), "10m", {}),
    ("decode waits over 0.5 s for KV after the first token: TransferSlowOrFailing",
     healthy(70) + transfer_wait(60, 30, 70), "10m", {"TransferSlowOrFailing": [{}]}),
    ("reservations expiring: TransferSlowOrFailing on that decode worker",
     healthy(70) + [counter("pdserve:kv_reservations_expired_total", f'worker="{D}", role="decode"', 2, 70)],
     "10m", {"TransferSlowOrFailing": [{"worker": D}]}),
    ("a worker out of the pool for 2 minutes: WorkerDown",
     healthy(70) + [gauge("pdserve:worker_up", f'worker="{D}", role="decode"', "1x5 0x10")], "8m",
     {"WorkerDown": [{"worker": D, "role": "decode", "instance": "router:8000"}]}),
    ("a worker out for one heartbeat blip is not WorkerDown",
     healthy(70) + [gauge("pdserve:worker_up", f'worker="{D}", role="decode"', "1x5 0 1x10")], "8m", {}),
    ("the router unreachable: RouterDown", healthy(70) + [gauge("up", "", "1x5 0x10")], "8m",
     {"RouterDown": [{"instance": "router:8000"}]}),
    ("an open worker breaker and an open link breaker: CircuitOpen for each",
     healthy(70) + [gauge("pdserve:worker_breaker_state", f'worker="{D}", role="decode"', "0x3 2x10"),
                    gauge("pdserve:link_breaker_state", f'prefill="{P}", decode="{D}"', "0x3 2x10"),
                    gauge("pdserve:worker_breaker_state", f'worker="{P}", role="prefill"', "1x13")],
     "8m", {"CircuitOpen": [{"worker": D, "role": "decode"}, {"prefill": P, "decode": D}]}),
]

# Recording rules whose values the alerts rest on, checked directly.
EXPRS = [
    ("the prefill share of TTFT", ttft(60, 0, 180, 20) + phases(20, prefill_queue=100, prefill=62, router_queue=18),
     "10m", "pdserve:prefill_share_of_ttft:rate5m", 0.9),
    ("the TTFT miss ratio", ttft(100, 75, 30, 20), "10m", "pdserve:ttft_slo_miss_ratio:rate5m", 0.25),
    ("the TPOT miss ratio", tpot(100, 60, 20), "10m", "pdserve:tpot_slo_miss_ratio:rate5m", 0.4),
]


def _rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def _render(text: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda mt: labels.get(mt.group(1), ""), text)


def build() -> str:
    rules = _rules()
    assert sorted(rules) == sorted(ALL), f"rules and ALL differ: {sorted(rules)}"
    tests = []
    for what, series, at, fires in CASES:
        assert set(fires) <= set(rules), fires
        alerts = []
        for name in ALL:
            exp = []
            for extra in fires.get(name, []):
                labels = {"job": "pdserve", **{k: str(v) for k, v in rules[name]["labels"].items()}, **extra}
                exp.append({"exp_labels": labels,
                            "exp_annotations": {k: _render(v, labels) for k, v in rules[name]["annotations"].items()}})
            alerts.append({"eval_time": at, "alertname": name, "exp_alerts": exp})
        tests.append({"name": what, "interval": "1m", "input_series": series, "alert_rule_test": alerts})
    for what, series, at, expr, value in EXPRS:
        tests.append({"name": what, "interval": "1m", "input_series": series,
                      "promql_expr_test": [{"expr": expr, "eval_time": at,
                                            "exp_samples": [{"labels": f"{expr}{{job=\"pdserve\"}}", "value": value}]}]})
    doc = {"rule_files": ["../pdserve-alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    return "# Generated by build.py from its cases and the rules' annotations: edit those, then run it.\n" + \
        yaml.safe_dump(doc, sort_keys=False, width=120)


if __name__ == "__main__":
    OUT.write_text(build())
    sys.stdout.write(f"wrote {OUT}\n")
