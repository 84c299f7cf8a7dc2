"""Pooling compare runs rate by rate: counts, Wilson intervals, goodput readings."""

from __future__ import annotations

import pytest

from pdserve.bench.pooled import goodput, pool, wilson


def _payload(att: dict[str, list[tuple[float, float, int]]], slo_tpot: float = 60.0) -> dict:
    cfg = {"workload": "w", "slo_ttft_ms": 3000.0, "slo_tpot_ms": slo_tpot, "slo_itl_ms": 150.0,
           "length_scale": 0.25, "workers": 2}
    return {"config": cfg, "modes": {m: {"runs": [{"rate": r, "summary": {"num_prompts": n, "slo_attainment": a}}
                                                   for r, a, n in rows]} for m, rows in att.items()}}


def test_wilson_matches_the_textbook_values() -> None:
    lo, hi = wilson(9, 10)
    assert lo == pytest.approx(0.5958, abs=1e-4) and hi == pytest.approx(0.9821, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(100, 100)
    assert hi == pytest.approx(1.0) and 0.96 < lo < 0.97


def test_pool_sums_requests_per_rate_across_runs() -> None:
    a = _payload({"colocated": [(4.0, 0.9375, 32), (6.0, 0.5, 32)]})
    b = _payload({"colocated": [(4.0, 0.828125, 64), (8.0, 0.25, 64)]})
    rows = pool([a, b])["colocated"]
    assert [(r["rate"], r["requests"], r["met"], r["runs"]) for r in rows] == [
        (4.0, 96, 30 + 53, 2), (6.0, 32, 16, 1), (8.0, 64, 16, 1)]
    assert rows[0]["attainment"] == pytest.approx(83 / 96)
    assert rows[0]["interval95"][0] < 83 / 96 < rows[0]["interval95"][1]


def test_pool_refuses_runs_with_different_slos() -> None:
    with pytest.raises(ValueError, match="differ"):
        pool([_payload({"colocated": [(4.0, 1.0, 8)]}), _payload({"colocated": [(4.0, 1.0, 8)]}, slo_tpot=50.0)])


def test_goodput_readings_differ_on_a_dip() -> None:
    rows = [{"rate": r, "attainment": a} for r, a in ((2.0, 1.0), (4.0, 0.89), (6.0, 0.95), (8.0, 0.5))]
    assert goodput(rows) == {"highest": 6.0, "before_first_miss": 2.0}
    assert goodput([{"rate": 1.0, "attainment": 0.5}]) == {"highest": 0.0, "before_first_miss": 0.0}
