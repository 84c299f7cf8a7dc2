"""`pdserve calibrate` on a real colocated cluster: the overheads it writes make the simulator
reproduce the lightly loaded run it was measured on."""

import json
import shutil
from pathlib import Path

import pytest

from pdserve.bench.calibrate import calibrate
from pdserve.bench.simcheck import CheckRun, fit_link, register_link, sim_run
from tests.servers import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_calibrate_colocated(tmp_path: Path) -> None:
    prof = tmp_path / "profile.json"
    shutil.copy(REPO / "bench/results/profile_demo_cpu.json", prof)
    transfer = str(REPO / "bench/results/transfer.json")
    run = CheckRun(num_requests=6, rate=0.5, seed=1, workers=1, port=free_port(), warmup=True)
    serving = calibrate(str(prof), run, ["colocated"], transfer)
    s = serving["colocated"]
    assert s["step_overhead_s"] >= 0 and s["request_overhead_s"] >= 0
    assert json.loads(prof.read_text())["serving"]["colocated"] == s
    real = s["measured"]["real"]
    # Re-simulated with what was written, the calibration run's medians come back.
    run = CheckRun(num_requests=6, rate=0.5, seed=1, workers=1, profile=str(prof),
                   link=register_link(fit_link(Path(transfer), "demo")))
    sim = sim_run("colocated", run)["summary"]
    if s["request_overhead_s"] > 0:
        assert sim["median_ttft_ms"] == pytest.approx(real["median_ttft_ms"], rel=1e-6)
    # The request overhead only shifts requests in time; TPOT is as calibrated with the step overhead...
    with_step, bare = s["measured"]["sim_with_step_overhead"], s["measured"]["sim_profile_only"]
    assert sim["median_tpot_ms"] == pytest.approx(with_step["median_tpot_ms"], rel=1e-6)
    # ...which moved the simulated TPOT towards the real one.
    if s["step_overhead_s"] > 0:
        assert abs(with_step["median_tpot_ms"] - real["median_tpot_ms"]) < abs(bare["median_tpot_ms"] - real["median_tpot_ms"])
