"""Planner: the configurations it returns meet the SLOs when simulated again, and are minimal
(one instance fewer of either role misses them)."""


import pytest

from pdserve.sim.build import build
from pdserve.sim.metrics import SLO, attainment
from pdserve.sim.planner import PlanInput, format_plan, plan_colocated, plan_disagg, retime
from pdserve.sim.scenario import run_seed
from pdserve.workload import generate


def _attainment(cfg, inp: PlanInput) -> float:  # type: ignore[no-untyped-def]
    return float(attainment(build(cfg).run(inp.specs), inp.slo).mean())


@pytest.mark.parametrize("rate", [40.0])
def test_plans_meet_the_slo_and_are_minimal(rate: float) -> None:
    specs = retime(generate("chatbot", 200, rate=1.0, seed=0), rate)
    inp = PlanInput("llama-3.1-8b", rate, specs, SLO(ttft_ms=2000, tpot_ms=100))
    dis, col = plan_disagg(inp), plan_colocated(inp)
    assert dis is not None and col is not None
    assert dis.config.num_prefill >= 1 and dis.config.num_decode >= 1
    for plan, roles in ((dis, ("prefill", "decode")), (col, ("colocated",))):
        assert _attainment(plan.config, inp) == pytest.approx(plan.attainment)  # what it reports
        assert plan.attainment >= inp.target
        assert plan.cost == plan.config.cost_per_hour()
        for role in roles:
            n = getattr(plan.config, f"num_{role}")
            if n > 1:
                fewer = plan.config.with_workers(**{role: n - 1})
                assert _attainment(fewer, inp) < inp.target, f"{role}={n - 1} would do"
    if rate > 10:  # the case where the analytical start overshoots: the search must not stop there
        assert dis.config.num_prefill + dis.config.num_decode > 2
    assert "colocated / disaggregated" in format_plan(dis, col, inp)


def test_seed_scenario_numbers() -> None:
    r = run_seed(num_requests=40)
    assert r["arithmetic"]["kv_per_token_gqa_bytes"] == 327_680
    assert 50 < r["arithmetic"]["transfer_100g_ms"] < 60  # 655 MB over 11.25 GB/s effective
    assert set(r["ratios"]) and all(v > 0 for v in r["ratios"].values())
