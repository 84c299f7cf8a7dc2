"""Unit tests of the monitoring pieces, stepped by hand: worker telemetry and its re-export by the
router, the step-delay fault, the tracer (SDK in-memory exporter), and `pdserve top`'s arithmetic."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.serve import messages as m
from pdserve.serve.metrics import ServerMetrics
from pdserve.serve.step_delay import StepDelay
from pdserve.serve.telemetry import WorkerTelemetry, failure_reason, overlap_share
from pdserve.serve.tracing import Tracer
from pdserve.top import Snapshot, fraction_within, frame, quantile


@pytest.mark.parametrize(("error", "reason"), [
    ("receiver refused layer 3: checksum mismatch", "checksum"),
    ("receiver refused layer 0: payload authentication failed", "checksum"),
    ("connection lost: ConnectionResetError(104, 'Connection reset by peer')", "cut"),
    ("send failed: BrokenPipeError(32, 'Broken pipe')", "cut"),
    ("no progress for 30.0s", "timeout"),
    ("receiver refused layer 0: request not expected here", "refused"),
    ("receiver refused layer 1: chunk names blocks that were not reserved for this request", "refused"),
    ("aborted by the sender", "aborted"),
    ("something new", "other"),
])
def test_failure_reasons_from_the_transfer_errors(error: str, reason: str) -> None:
    assert failure_reason(error) == reason


def test_overlap_share() -> None:
    assert overlap_share(10.0, 12.0, 11.5) == 0.75  # compute went on for 1.5 of the 2 s
    assert overlap_share(10.0, 12.0, 13.0) == 1.0
    assert overlap_share(10.0, 12.0, 9.0) == 0.0
    assert overlap_share(10.0, 10.0, 10.0) == 1.0


def _scrape(metrics: ServerMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def test_worker_families_cross_the_heartbeat_and_the_router_names_the_worker() -> None:
    pre, dec = WorkerTelemetry(), WorkerTelemetry()
    pre.pair_seen("decode@d:1", "tcp")
    pre.transfer_bytes.labels("decode@d:1", "tcp").inc(4096)
    pre.transfer_seconds.labels("decode@d:1", "tcp").observe(0.003)
    pre.transfer_failed("decode@d:1", "tcp", "no progress for 30.0s")
    pre.step.observe(0.07)
    dec.step.observe(0.004)
    dec.step.observe(0.2)
    dec.expired.inc()
    stats = [m.decode_to_router(m.encode(m.Stats("n", role, 0, 0, 1, 1, 0.0, metrics=t.families())))
             for role, t in (("prefill", pre), ("decode", dec))]
    router = ServerMetrics(dict, worker_metrics=lambda: [("prefill@p:1", "prefill", stats[0].metrics),
                                                         ("decode@d:1", "decode", stats[1].metrics)])
    got = _scrape(router)
    pair = {"prefill": "prefill@p:1", "decode": "decode@d:1", "role": "prefill", "transport": "tcp"}
    assert got["pdserve:kv_transfer_bytes_total"] == [(pair, 4096.0)]
    assert ({**pair, "reason": "timeout"}, 1.0) in got["pdserve:kv_transfer_failures_total"]
    assert ({**pair, "reason": "checksum"}, 0.0) in got["pdserve:kv_transfer_failures_total"]
    steps = {lab["worker"]: v for lab, v in got["pdserve:engine_step_seconds_count"]}
    assert steps == {"prefill@p:1": 1.0, "decode@d:1": 2.0}
    buckets = {lab["le"]: v for lab, v in got["pdserve:engine_step_seconds_bucket"] if lab["worker"] == "decode@d:1"}
    assert buckets["0.005"] == 1.0 and buckets["0.15"] == 1.0 and buckets["0.3"] == 2.0 and buckets["+Inf"] == 2.0
    assert ({"worker": "decode@d:1", "role": "decode"}, 1.0) in got["pdserve:kv_reservations_expired_total"]
    assert not any(name.endswith("_created") for name in got if name.startswith("pdserve:kv_transfer"))


def test_step_delay_static_then_file_then_file_gone(tmp_path: Path) -> None:
    path = tmp_path / "faults.json"
    d = StepDelay("decode", prefill_ms=500, decode_ms=20, path=str(path))
    assert d.configured and d.seconds(0.0) == 0.02  # no file: the setting
    path.write_text(json.dumps({"fault_decode_step_delay_ms": 300, "fault_prefill_delay_ms": 9}))
    assert d.seconds(0.5) == 0.02  # read at most once a second
    assert d.seconds(1.0) == 0.3
    os.utime(path, (time.time() + 5, time.time() + 5))
    path.write_text("{half a fi")
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert d.seconds(2.0) == 0.3  # a half-written file keeps the last value
    path.write_text(json.dumps({"fault_decode_step_delay_ms": 50}))
    os.utime(path, (time.time() + 15, time.time() + 15))
    assert d.seconds(3.0) == 0.05  # changed again: the new value
    path.unlink()
    assert d.seconds(4.0) == 0.02
    assert StepDelay("prefill", 500, 20).seconds(0.0) == 0.5
    assert not StepDelay("colocated", 500, 20, str(path)).configured
    assert not StepDelay("decode", 0, 0).configured


def test_tracer_off_does_nothing() -> None:
    t = Tracer("", "svc")
    assert not t.enabled
    span = t.start_request("r", time.monotonic())
    assert span is None and t.traceparent(span) == ""
    t.record("prefill", "", 1.0, 2.0)
    t.end(span, 2.0)
    t.shutdown()


def test_spans_of_two_processes_join_one_trace_through_the_traceparent() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    router, worker = Tracer("", "pdserve-router", exporter), Tracer("", "pdserve-prefill", exporter)
    t0 = time.monotonic()
    root = router.start_request("cmpl-1", t0)
    tp = router.traceparent(root)
    assert tp.startswith("00-") and len(tp.split("-")) == 4
    router.record("router_queue", tp, t0, t0 + 0.01)
    worker.record("prefill", tp, t0 + 0.01, t0 + 0.2, prompt_tokens=32)  # the other side: only the string
    router.end(root, t0 + 0.5)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"request", "router_queue", "prefill"}
    trace_id = spans["request"].context.trace_id
    for name in ("router_queue", "prefill"):
        assert spans[name].context.trace_id == trace_id
        assert spans[name].parent is not None and spans[name].parent.span_id == spans["request"].context.span_id
    assert spans["prefill"].resource.attributes["service.name"] == "pdserve-prefill"
    assert spans["prefill"].attributes["prompt_tokens"] == 32
    assert abs((spans["prefill"].end_time - spans["prefill"].start_time) - 0.19e9) < 1e6


def test_histogram_quantile_and_attainment_like_prometheus() -> None:
    b = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    assert quantile(0.5, b) == pytest.approx(0.1)
    assert quantile(0.7, b) == pytest.approx(0.3)  # 20 of the 40 in (0.1, 0.5]
    assert quantile(0.95, b) == pytest.approx(0.75)
    assert fraction_within(0.5, b) == pytest.approx(0.9)
    assert fraction_within(0.3, b) == pytest.approx(0.7)
    assert math.isnan(quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))
    assert quantile(0.99, [(0.1, 1.0), (math.inf, 2.0)]) == 0.1  # in +Inf: the highest finite bound


def _text(bytes_: float, transfers: float, ttft_good: float, ttft_all: float) -> str:
    w = 'worker="decode@d:1",role="decode"'
    pair = 'prefill="prefill@p:1",decode="decode@d:1",role="prefill",transport="tcp"'
    return "\n".join([
        "# TYPE pdserve:worker_up gauge", f"pdserve:worker_up{{{w}}} 1",
        "# TYPE pdserve:worker_kv_cache_usage gauge", f"pdserve:worker_kv_cache_usage{{{w}}} 0.25",
        "# TYPE pdserve:kv_transfer_bytes counter", f"pdserve:kv_transfer_bytes_total{{{pair}}} {bytes_}",
        "# TYPE pdserve:kv_transfer_seconds histogram",
        f'pdserve:kv_transfer_seconds_bucket{{{pair},le="+Inf"}} {transfers}',
        f"pdserve:kv_transfer_seconds_count{{{pair}}} {transfers}",
        f"pdserve:kv_transfer_seconds_sum{{{pair}}} {transfers * 0.01}",
        "# TYPE pdserve:time_to_first_token_seconds histogram",
        f'pdserve:time_to_first_token_seconds_bucket{{le="1.0"}} {ttft_good}',
        f'pdserve:time_to_first_token_seconds_bucket{{le="+Inf"}} {ttft_all}',
        f"pdserve:time_to_first_token_seconds_count {ttft_all}",
        f"pdserve:time_to_first_token_seconds_sum {ttft_all}", ""])


def test_top_frame_rates_are_over_the_interval() -> None:
    before = Snapshot.parse(_text(1e9, 10, 10, 10), at=100.0)
    now = Snapshot.parse(_text(5e9, 30, 25, 30), at=102.0)
    screen = "\n".join(frame(now, before, 1.0, 0.1))
    link = next(ln for ln in screen.splitlines() if ln.startswith("p:1 -> "))
    assert link.split()[:6] == ["p:1", "->", "d:1", "tcp", "2.000", "10.0"]  # 4 GB in 2 s; 20 transfers
    assert "10ms" in link and link.rstrip().endswith("closed")
    assert "TTFT<=1000ms: 75%" in screen  # 15 of the last 20 within the SLO
    assert "decode@d:1" in screen and " 25%" in screen


def test_top_shows_the_current_role_and_marks_a_switched_worker() -> None:
    text = "\n".join(["# TYPE pdserve:worker_up gauge", 'pdserve:worker_up{worker="prefill@p:1",role="decode"} 1',
                      'pdserve:worker_up{worker="decode@d:1",role="decode"} 1', ""])
    screen = frame(Snapshot.parse(text, at=1.0), None, 1.0, 0.1)
    rows = {ln.split()[0]: ln.split()[1] for ln in screen if ln.startswith(("prefill@", "decode@"))}
    assert rows == {"prefill@p:1": "decode*", "decode@d:1": "decode"}
    assert any(ln.startswith("* switched: serves this role now") for ln in screen)
