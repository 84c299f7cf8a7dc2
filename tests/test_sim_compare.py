"""The simulator on a recorded bench compare (pdserve/bench/simcompare.py), on a small synthetic one
whose "real" side is itself simulated with known serving overheads."""

from __future__ import annotations

import pytest

from pdserve.bench import simcompare as sc
from pdserve.bench.simcheck import register_link
from pdserve.sim.profile import write_profile

REQS = [(0.0, 200, 20), (0.3, 150, 30), (0.2, 260, 12), (0.9, 180, 25), (1.1, 240, 16), (1.4, 210, 22)]


def _compare(rates: tuple[float, ...]) -> dict:
    runs = [{"rate": r, "requests": [{"arrival_s": a / r, "prompt_tokens": p, "output_tokens": o} for a, p, o in REQS],
             "summary": {}} for r in rates]
    workers = {"colocated": {"prefill": 0, "decode": 0, "colocated": 2},
               "disaggregated": {"prefill": 1, "decode": 1, "colocated": 0}}
    return {"config": {"model": "demo", "workload": "chatbot-small", "slo_ttft_ms": 400.0, "slo_tpot_ms": 40.0,
                       "slo_itl_ms": 80.0},
            "modes": {m: {"workers": w, "runs": [dict(r, requests=list(r["requests"])) for r in runs]}
                      for m, w in workers.items()}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("simcompare")
    bare = d / "bare.json"
    write_profile(bare, [[n, 0.01 + 2e-4 * n] for n in (16, 128, 512, 1024)],
                  [[b, c, 0.015 + 1e-3 * b + 1e-6 * b * c] for b in (1, 4, 16) for c in (64, 512)], attention="grouped")
    link = register_link({"bandwidth_Bps": 1e9, "latency_s": 1e-4})
    return str(bare), link


def test_real_runs_made_with_known_overheads_are_predicted_and_the_overheads_recovered(setup) -> None:  # type: ignore[no-untyped-def]
    bare, link = setup
    cmp_ = _compare((1.0, 4.0))
    truth = {"colocated": {"step_overhead_s": 0.006, "request_overhead_s": 0.03},
             "disagg": {"step_overhead_s": 0.004, "request_overhead_s": 0.05}}
    served = sc.with_overheads(bare, truth)
    try:
        for mode, m in cmp_["modes"].items():
            for k, run in enumerate(m["runs"]):
                run["summary"] = sc.simulate(cmp_, mode, k, served, link)
    finally:
        import os

        os.unlink(served)
    found = sc.overheads_from(cmp_, bare, link, 0)
    for mode, want in truth.items():
        assert found[mode]["step_overhead_s"] == pytest.approx(want["step_overhead_s"], abs=1e-3)
        assert found[mode]["request_overhead_s"] == pytest.approx(want["request_overhead_s"], abs=2e-3)
    # The simulator with the true overheads predicts those runs exactly, winners included.
    served = sc.with_overheads(bare, truth)
    try:
        res = sc.predict(cmp_, served, link)
    finally:
        os.unlink(served)
    assert res["scores"]["winner_agrees"] == [True, True]
    for row in res["rates"]:
        for m in row["modes"].values():
            assert all(e is None or e == pytest.approx(0.0, abs=1e-9) for e in m["error"].values())
    # ...and without them it is off, and says so.
    off = sc.predict(cmp_, bare, link, serving_overheads=False)
    assert off["scores"]["colocated"]["median_ttft_ms"]["median_abs"] > 0.05


def test_winner_ties_within_five_percent() -> None:
    assert sc.winner({"colocated": 1.0, "disaggregated": 0.97}) == "tie"
    assert sc.winner({"colocated": 0.0, "disaggregated": 0.0}) == "tie"
    assert sc.winner({"colocated": 0.5, "disaggregated": 1.0}) == "disaggregated"
    assert [s.arrival_s for s in sc.specs_of([{"arrival_s": 2, "prompt_tokens": 5, "output_tokens": 2},
                                              {"arrival_s": 1, "prompt_tokens": 6, "output_tokens": 3}])] == [1, 2]


def test_a_machine_twice_as_slow_is_found_as_a_factor_of_two(setup) -> None:  # type: ignore[no-untyped-def]
    import json
    import os

    bare, link = setup
    cmp_ = _compare((1.0, 3.0))
    slow = sc.temp_profile(sc.scaled(json.loads(open(bare).read()), 2.0))
    try:
        for mode, m in cmp_["modes"].items():
            for k, run in enumerate(m["runs"]):
                run["summary"] = sc.simulate(cmp_, mode, k, slow, link)
                run["summary"]["load_average"] = [4.0 * (k + 1)] * 3  # the second run at twice the load
    finally:
        os.unlink(slow)
    found = sc.slowdown_from(cmp_, bare, link, 0)
    try:
        for s in found.values():
            assert s["factor"] == pytest.approx(2.0, rel=0.02) and s["request_overhead_s"] < 0.01
    finally:
        for s in found.values():
            os.unlink(s.pop("profile"))
    ls = sc.LoadScaled(cmp_, bare, found, cmp_)
    try:
        sc.predict(cmp_, ls, link)
        assert {m: [round(f, 1) for f in fs] for m, fs in ls.factors.items()} == {
            "colocated": [2.0, 4.0], "disaggregated": [2.0, 4.0]}
    finally:
        ls.close()
