"""Planner: finishes quickly on a small case and returns SLO-meeting configurations."""

import time

from pdserve.sim.metrics import SLO
from pdserve.sim.planner import PlanInput, format_plan, plan_colocated, plan_disagg, retime
from pdserve.sim.scenario import run_seed
from pdserve.workload import generate


def test_plan_small_case_fast() -> None:
    t0 = time.perf_counter()
    specs = retime(generate("chatbot", 80, rate=1.0, seed=0), 4.0)
    inp = PlanInput("llama-3.1-8b", 4.0, specs, SLO(ttft_ms=2000, tpot_ms=100))
    dis, col = plan_disagg(inp), plan_colocated(inp)
    assert dis is not None and col is not None
    assert dis.attainment >= 0.9 and col.attainment >= 0.9
    assert dis.config.num_prefill >= 1 and dis.config.num_decode >= 1
    assert "colocated / disaggregated" in format_plan(dis, col, inp)
    assert time.perf_counter() - t0 < 60


def test_seed_scenario_numbers() -> None:
    r = run_seed(num_requests=40)
    assert r["arithmetic"]["kv_per_token_gqa_bytes"] == 327_680
    assert 50 < r["arithmetic"]["transfer_100g_ms"] < 60  # 655 MB over 11.25 GB/s effective
    assert set(r["ratios"]) and all(v > 0 for v in r["ratios"].values())
