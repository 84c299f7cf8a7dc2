"""Benchmark arithmetic on hand-made timelines: percentiles, TPOT vs ITL, goodput, attainment, busy time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pdserve.bench.client import RequestRecord, RunResult
from pdserve.bench.cluster import busy_during, parse_busy
from pdserve.bench.report import summarize_run
from pdserve.bench.table import slo_rate, winner
from pdserve.cli import build_parser
from pdserve.metrics_summary import SLO, attainment, summarize

NAN = float("nan")
TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"  # shared/ lies beside the repo
if not TRACES.is_dir():
    TRACES = Path("/work/shared/traces")


def _records() -> list[RequestRecord]:
    """A: 4 tokens at 100, 110, 120, 400 ms. B: 2 tokens at 200, 220 ms. C: 1 token at 50 ms. D: failed."""
    a = RequestRecord(0, 0.0, 10, 4, generated_tokens=4, ttft_s=0.100, e2el_s=0.400,
                      itl_s=[0.010, 0.010, 0.280], success=True, timings={"prefill": 0.08, "decode": 0.3})
    b = RequestRecord(1, 0.5, 20, 2, generated_tokens=2, ttft_s=0.200, e2el_s=0.220, itl_s=[0.020],
                      success=True, timings={"prefill": 0.12, "decode": 0.02})
    c = RequestRecord(2, 1.0, 30, 1, generated_tokens=1, ttft_s=0.050, e2el_s=0.050, success=True)
    d = RequestRecord(3, 1.5, 40, 8, error="HTTP 500: boom")
    return [a, b, c, d]


def test_tpot_weights_requests_itl_weights_gaps() -> None:
    res = summarize_run(RunResult(_records(), duration_s=2.0))
    # TPOT per request: A (400-100)/3 = 100, B (220-200)/1 = 20, C undefined (1 token).
    assert res["mean_tpot_ms"] == pytest.approx(60.0)
    assert res["median_tpot_ms"] == pytest.approx(60.0)
    # ITL over every gap: 10, 10, 280, 20.
    assert res["mean_itl_ms"] == pytest.approx(80.0)
    assert res["median_itl_ms"] == pytest.approx(15.0)
    assert res["p99_itl_ms"] == pytest.approx(np.percentile([10, 10, 280, 20], 99))


def test_percentiles_and_throughput() -> None:
    res = summarize_run(RunResult(_records(), duration_s=2.0))
    assert (res["completed"], res["failed"], res["num_prompts"]) == (3, 1, 4)
    # TTFT of the finished: 100, 200, 50 -> linear interpolation like numpy / vllm.
    assert res["median_ttft_ms"] == pytest.approx(100.0)
    assert res["p90_ttft_ms"] == pytest.approx(180.0)
    assert res["p99_ttft_ms"] == pytest.approx(198.0)
    assert res["mean_e2el_ms"] == pytest.approx((400 + 220 + 50) / 3)
    assert res["request_throughput"] == pytest.approx(1.5)
    assert res["total_output_tokens"] == 7 and res["output_throughput"] == pytest.approx(3.5)
    assert res["total_input_tokens"] == 60 and res["total_token_throughput"] == pytest.approx(33.5)
    assert res["phases_mean_ms"] == pytest.approx({"prefill": 100.0, "decode": 160.0})
    assert res["errors"] == ["HTTP 500: boom"]


def test_goodput_and_attainment() -> None:
    run = RunResult(_records(), duration_s=2.0)
    # TTFT <= 150 and TPOT <= 50: A misses TPOT, B misses TTFT, C meets both (TPOT vacuous), D failed.
    res = summarize_run(run, SLO(ttft_ms=150, tpot_ms=50))
    assert res["request_goodput"] == pytest.approx(0.5)
    assert res["slo_attainment"] == pytest.approx(0.25)
    res = summarize_run(run, SLO(ttft_ms=250))
    assert res["slo_attainment"] == pytest.approx(0.75)  # the failure still counts as a miss
    assert "request_goodput" not in summarize_run(run, SLO())


def test_shared_summary_ignores_nan_and_handles_empty() -> None:
    res = summarize(np.array([NAN]), np.array([NAN]), np.zeros(0), np.array([5]), np.array([3]), 1.0)
    assert res["completed"] == 0 and res["mean_ttft_ms"] == 0.0 and res["p99_itl_ms"] == 0.0
    assert not math.isnan(res["mean_tpot_ms"])


def test_busy_fraction_from_cumulative_scrapes() -> None:
    text = ('pdserve:worker_busy_fraction{role="prefill",worker="prefill@127.0.0.1:1"} 0.5\n'
            'pdserve:worker_busy_fraction{role="decode",worker="decode@127.0.0.1:2"} 0.25\n'
            'pdserve:busy_fraction 0.4\n')
    assert parse_busy(text) == {"prefill@127.0.0.1:1": 0.5, "decode@127.0.0.1:2": 0.25}
    # Ready at t=0. At t=10 prefill had been busy 10% (1 s); at t=20, 50% (10 s): 9 s of 10.
    during = busy_during((10.0, {"p": 0.1, "d": 0.0}), (20.0, {"p": 0.5, "d": 0.25}), ready_at=0.0)
    assert during == pytest.approx({"p": 0.9, "d": 0.5})


def test_table_helpers() -> None:
    assert winner(1.0, 2.0, higher_better=True) == "disagg"
    assert winner(1.0, 2.0, higher_better=False) == "colocated"
    assert winner(100.0, 103.0, higher_better=False) == "~"
    runs = [{"rate": r, "summary": {"slo_attainment": a}} for r, a in ((1, 1.0), (2, 0.92), (4, 0.5))]
    assert slo_rate(runs) == 2


@pytest.mark.parametrize("name", ["azure2023_conv.csv", "azure2023_code.csv"])
def test_bench_trace_flags_fit_demo_context(name: str) -> None:
    from pdserve.bench.run import specs_for

    args = build_parser().parse_args(
        ["bench", "run", "--trace", str(TRACES / name), "--arrival", "trace", "--num-requests", "200",
         "--time-scale", "0.1", "--length-scale", "0.25", "--max-prompt-tokens", "1536",
         "--max-output-tokens", "256"])
    specs = specs_for(args, args.rate)
    assert len(specs) == 200 and specs[0].arrival_s == 0.0
    assert all(s.prompt_tokens + s.output_tokens <= 2048 for s in specs)
    assert [s.arrival_s for s in specs] == sorted(s.arrival_s for s in specs)


def test_worst_gap_slo() -> None:
    """An ITL SLO judges each request by its worst gap; a 1-token output has none and passes it."""
    ms = np.array
    good = attainment(ms([10.0, 10.0, 10.0]), ms([5.0, 5.0, np.nan]), ms([50.0, 50.0, 10.0]), SLO(itl_ms=40),
                      max_itl=ms([30.0, 45.0, np.nan]))
    assert good.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="itl"):
        attainment(ms([1.0]), ms([1.0]), ms([1.0]), SLO(itl_ms=40))


def test_rescore_recomputes_attainment_from_the_records(tmp_path: Path) -> None:
    from pdserve.bench.compare import rescore

    def run(worst_gap_s: float) -> dict:  # type: ignore[type-arg]
        rec = RequestRecord(0, 0.0, 8, 3, generated_tokens=3, ttft_s=0.1, e2el_s=0.1 + 2 * worst_gap_s,
                            itl_s=[worst_gap_s, worst_gap_s], success=True)
        return {"rate": 1.0, "summary": {"duration": 1.0, "worker_busy_fraction": {"w": 0.5}},
                "requests": [rec.as_dict()]}

    payload = {"command": "pdserve bench compare", "config": {},
               "modes": {"colocated": {"label": "c", "runs": [run(0.5)]},
                         "disaggregated": {"label": "d", "runs": [run(0.02)]}}}
    src = tmp_path / "cmp.json"
    src.write_text(json.dumps(payload))
    args = build_parser().parse_args(["bench", "rescore", str(src), "--name", "re", "--out-dir", str(tmp_path),
                                      "--slo-itl-ms", "100"])
    assert rescore(args) == 0
    out = json.loads((tmp_path / "re.json").read_text())
    att = {m: v["runs"][0]["summary"]["slo_attainment"] for m, v in out["modes"].items()}
    assert att == {"colocated": 0.0, "disaggregated": 1.0}
    assert out["modes"]["colocated"]["runs"][0]["summary"]["worker_busy_fraction"] == {"w": 0.5}
