"""The simulator with the planner in the loop (sim/elastic.py) and the planner's capacity model (sim/capacity.py)."""

from __future__ import annotations

import math

import pytest

from pdserve.config.model import resolve_shape
from pdserve.metrics_summary import SLO
from pdserve.sched.sla_planner import PlannerSettings, SlaPlanner, Split
from pdserve.sim.capacity import StepCapacity, roofline_capacity
from pdserve.sim.elastic import CHAT, LONG, ElasticSim, Interval, window_specs
from pdserve.sim.hardware import get_gpu
from pdserve.sim.perf_model import RooflineModel
from pdserve.sim.planner import decode_capacity, prefill_capacity

MODEL = "llama-3-70b"


def test_capacity_is_the_capacity_planners_model() -> None:
    """Without an SLO or a KV bound, StepCapacity over the roofline gives `pdserve plan`'s numbers."""
    shape = resolve_shape(MODEL)
    cap = StepCapacity(RooflineModel(shape, get_gpu("h100"), 4))
    for prompt, output in ((300.0, 500.0), (4000.0, 120.0)):
        assert cap.prefill_rate(prompt) == pytest.approx(prefill_capacity(shape, "h100", 4, prompt))
        assert cap.decode_rate(prompt, output) == pytest.approx(decode_capacity(shape, "h100", 4, prompt, output, None))
        assert cap.decode_rate(prompt, output, 0.03) == pytest.approx(
            decode_capacity(shape, "h100", 4, prompt, output, 30.0))


def test_capacity_shape() -> None:
    cap = roofline_capacity(MODEL, "h100", 4)
    p, o = LONG[0].mean, LONG[1].mean
    assert 0 < cap.prefill_rate(p, 1.0) < cap.prefill_rate(p, 3.0) <= cap.prefill_rate(p)  # a tighter SLO takes less
    assert cap.decode_rate(p, o, 0.02) < cap.decode_rate(p, o, 0.05)
    assert cap.decode_rate(p, o) < StepCapacity(cap.step).decode_rate(p, o)  # KV memory bounds the batch
    # long prompts: a colocated instance's steps carry prefill chunks, so at a tight TPOT it is worth less
    # than its share of a prefill + decode pair; short prompts: about the same
    per_req = {m: 1 / cap.prefill_rate(p, 3.0) + 1 / cap.decode_rate(p, o, 0.04) if m == "disagg"
               else 1 / cap.colocated_rate(p, o, 3.0, 0.04) for m in ("disagg", "colocated")}
    assert per_req["colocated"] > 1.2 * per_req["disagg"]
    ttft_lo, tpot_lo = cap.expected("disagg", p, o, 0.1)
    ttft_hi, tpot_hi = cap.expected("disagg", p, o, 0.9 * cap.prefill_rate(p))
    assert ttft_hi > ttft_lo > 0 and tpot_hi >= tpot_lo > 0


def test_replay_follows_the_planner_and_is_seeded() -> None:
    slo = SLO(ttft_ms=3000, tpot_ms=40)
    sim = ElasticSim(MODEL, slo, interval_s=3600, window_s=2.0, switch_s=30.0)
    day = [Interval(0, 4.0, *CHAT, "chat"), Interval(3600, 10.0, *LONG, "long"),
           Interval(7200, 10.0, *LONG, "long")]
    planner = SlaPlanner(roofline_capacity(MODEL, "h100", 4), PlannerSettings(
        slo_ttft_s=3.0, slo_tpot_s=0.04, predictor="constant", elastic=True, max_total=16, cooldown_s=0.0))
    r = sim.replay(day, "planner", planner=planner, start=Split(1, 1))
    splits = [x.split for x in r.intervals]
    assert splits[0] == Split(1, 1)
    assert all(x.decision is not None for x in r.intervals)
    # the sim's instances take the roles the planner decided: each interval runs the previous decision
    for prev, cur in zip(r.intervals, r.intervals[1:], strict=False):
        assert Split(**prev.decision["wanted"]) == cur.split  # type: ignore[index]
    assert splits[1].mode == "colocated"  # few short prompts: one colocated instance is cheapest
    assert splits[2].prefill >= 3 and splits[2].mode == "disagg"  # long prompts: disaggregated, prefill-heavy
    assert r.intervals[1].switching > 0  # the roles changed, and the change was charged its drain
    assert r.gpu_hours(4, 3600) == sum(s.total for s in splits) * 4
    again = sim.replay(day, "fixed", fixed=Split(2, 1))
    assert again.requests == r.requests == sum(len(window_specs(iv, 2.0, 1000 + k)) for k, iv in enumerate(day))
    assert sim.replay(day, "fixed", fixed=Split(2, 1)).attainment == again.attainment  # seeded: same requests
    assert 0.0 <= again.attainment <= 1.0 and not math.isnan(r.attainment)


def test_the_cool_down_counts_from_when_a_change_took_effect() -> None:
    """As serve/planner_loop.py does: a change decided at the end of interval 0 lands once its
    workers have switched (30 s into interval 1), so a 100 s cool-down still holds the scale-down
    the planner wants at the end of interval 2 (120 s after the decision, 90 s after it landed)."""
    slo = SLO(ttft_ms=3000, tpot_ms=40)
    sim = ElasticSim(MODEL, slo, interval_s=60, window_s=2.0, switch_s=30.0)
    day = [Interval(0, 12.0, *LONG, "long"), Interval(60, 0.5, *LONG, "long"), Interval(120, 0.5, *LONG, "long"),
           Interval(180, 0.5, *LONG, "long")]
    settings = dict(slo_ttft_s=3.0, slo_tpot_s=0.04, predictor="constant", elastic=True, max_total=16)

    def splits(cooldown_s: float) -> list[Split]:
        planner = SlaPlanner(roofline_capacity(MODEL, "h100", 4), PlannerSettings(**settings, cooldown_s=cooldown_s))
        return [x.split for x in sim.replay(day, "p", planner=planner, start=Split(1, 1)).intervals]

    free = splits(0.0)
    assert free[1].total > 2 and free[2].total < free[1].total  # up for the burst, down right after
    held = splits(100.0)
    assert held[1] == free[1]  # scale-up is never delayed
    assert held[2] == held[3] == held[1]  # 60 s, then 90 s since the change landed: held both times
