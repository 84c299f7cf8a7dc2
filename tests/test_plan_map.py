"""`pdserve plan --map`: the rate search, the P:D candidates, and one grid point end to end."""

import json
import math

from pdserve.sim.commands import main
from pdserve.sim.map import SEED_SCENARIOS, MapInput, _meets, _plan_base, _ratios, goodput
from pdserve.sim.metrics import SLO


def test_ratios_are_the_small_counts_nearest_the_balance() -> None:
    assert _ratios(1.0)[0] == (1, 1)
    assert _ratios(3.2)[0] == (3, 1)
    assert _ratios(0.3)[:2] == [(1, 3), (1, 4)]
    assert _ratios(100.0)[0] == (4, 1)  # no side beyond MAX_SIDE


def test_goodput_is_the_edge_where_the_slos_stop_holding() -> None:
    inp = MapInput("llama-3.1-8b", ["h100"], "cx7-400g", SLO(300.0, 30.0), [512], [16], num_requests=40)
    cfg = _plan_base(inp, mode="colocated", num_colocated=1, prefill_gpu="h100", tp_prefill=1)
    g = goodput(cfg, inp, 512, 16, guess=20.0)
    assert g > 0
    assert _meets(cfg, inp, 512, 16, g)
    assert not _meets(cfg, inp, 512, 16, g * 1.2)  # within the search's ~9% resolution
    assert goodput(cfg, MapInput(**{**inp.__dict__, "slo": SLO(1.0, 30.0)}), 512, 16, 20.0) == 0.0  # unmeetable


def test_plan_map_writes_the_json_and_png(tmp_path, capsys) -> None:
    out, png = tmp_path / "map.json", tmp_path / "map.png"
    rc = main(["plan", "--map", "--model", "llama-3.1-8b", "--gpus", "h100", "--prompts", "1024", "--outputs", "8",
               "--ttft-slo", "500", "--tpot-slo", "30", "--num-requests", "40", "--output", str(out),
               "--plot", str(png)])
    assert rc == 0
    res = json.loads(out.read_text())
    (pt,) = res["points"]
    assert pt["prompt"] == 1024 and pt["output"] == 8
    for side in ("disagg", "colocated"):
        assert pt[side]["goodput"] > 0 and pt[side]["per_gpu"] == pt[side]["goodput"] / pt[side]["gpus"]
    assert math.isclose(pt["ratio_per_gpu"], pt["disagg"]["per_gpu"] / pt["colocated"]["per_gpu"])
    assert [s["name"] for s in res["seed_scenarios"]] == [n for n, _, _ in SEED_SCENARIOS]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "disaggregated / colocated" in capsys.readouterr().out
