"""A shifting workload on a real cluster: fixed 1P1D vs fixed 2 colocated vs the online planner.

The same seeded requests for every system, in three phases: short prompts with long outputs, then
long prompts with short outputs, then short/long again. Each system is a fresh `pdserve up` of two
workers (demo model by default, on this machine's cores). The planner starts as 1P1D and may
switch roles (`--planner sla`, which needs runtime role switching: `ClusterBackend.switch_role`).
While a system runs, the router's /metrics is scraped every second for the workers' roles
(`pdserve:worker_up{worker,role}`) and, for the planner, its decisions. Reported: SLO attainment
per phase (requests by arrival time) and overall, the roles over time; JSON + PNG.

    pdserve profile --model demo --out /tmp/profile.json    # the planner's model of this machine, now
    python bench/elastic_bench.py --profile /tmp/profile.json   # all three systems, ~9 min
    python bench/elastic_bench.py --systems 1p1d,2c --phase-s 10 --out /tmp/eb   # dry run without the planner
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdserve.bench.client import run_requests  # noqa: E402
from pdserve.bench.cluster import running_cluster, up_args  # noqa: E402
from pdserve.bench.prompts import synth_prompts, vocab_ids  # noqa: E402
from pdserve.bench.report import header, write_json  # noqa: E402
from pdserve.metrics_summary import SLO, attainment, tpot_ms  # noqa: E402
from pdserve.workload import RequestSpec, arrival_times  # noqa: E402

SYSTEMS = {"1p1d": (1, 1, 0), "2c": (0, 0, 2), "planner": (1, 1, 0)}
_UP = re.compile(r'^pdserve:worker_up\{([^}]*)\}\s+(\S+)$', re.M)
_PLAN = re.compile(r'^pdserve:planner_workers\{kind="wanted",role="(\w+)"\}\s+(\S+)$', re.M)


def phases(args: argparse.Namespace) -> list[tuple[str, float, tuple[int, int], tuple[int, int]]]:
    """(name, rate, prompt range, output range) per phase."""
    short = ("short-prompt", args.rate_short, (16, 96), (96, 192))
    long = ("long-prompt", args.rate_long, (640, 1024), (8, 24))
    return [short, long, short]


def workload(args: argparse.Namespace) -> tuple[list[RequestSpec], list[str]]:
    """The seeded requests of all phases, back to back, and each request's phase."""
    import random

    specs: list[RequestSpec] = []
    names: list[str] = []
    for k, (name, rate, (plo, phi), (olo, ohi)) in enumerate(phases(args)):
        n = max(1, int(rate * args.phase_s))
        rng = random.Random(args.seed + k)
        t0 = k * args.phase_s
        for t in arrival_times(n, rate, seed=args.seed + k):
            if t < args.phase_s:
                specs.append(RequestSpec(t0 + t, rng.randint(plo, phi), rng.randint(olo, ohi)))
                names.append(f"{k + 1}:{name}")
    return specs, names


def watch(url: str, stop: threading.Event, out: list[dict[str, Any]], t0: float) -> None:
    """Every second: the roles of the workers up, and the planner's wanted split if it runs."""
    with httpx.Client(timeout=2.0) as c:
        while not stop.wait(1.0):
            try:
                text = c.get(url + "/metrics").text
            except httpx.HTTPError:
                continue
            roles: dict[str, int] = {}
            for labels, value in _UP.findall(text):
                role = re.search(r'role="(\w+)"', labels)
                if role and float(value) > 0:
                    roles[role.group(1)] = roles.get(role.group(1), 0) + 1
            out.append({"t": time.monotonic() - t0, "roles": roles,
                        "wanted": {r: float(v) for r, v in _PLAN.findall(text)}})


def run_system(name: str, args: argparse.Namespace, specs: list[RequestSpec], prompts: list[list[int]]
               ) -> dict[str, Any]:
    p, d, c = SYSTEMS[name]
    cmd = up_args(args.model, p, d, c, args.threads, args.port)
    if name == "planner":
        cmd += ["--planner", "sla", "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
                "--planner-interval-s", str(args.interval_s), "--planner-cooldown-s", str(args.cooldown_s)]
        if args.profile:
            cmd += ["--planner-profile", args.profile]
    print(f"== {name}: pdserve {' '.join(cmd)}", flush=True)
    timeline: list[dict[str, Any]] = []
    try:
        with running_cluster(cmd, args.port, name, args.startup_timeout) as cl:
            stop = threading.Event()
            t0 = time.monotonic()
            th = threading.Thread(target=watch, args=(cl.url, stop, timeline, t0), daemon=True)
            th.start()
            run = asyncio.run(run_requests(cl.url, args.model, specs, prompts, progress=False))
            stop.set()
            th.join()
            log_tail = cl.tail(200) if name == "planner" else ""
    except RuntimeError as e:  # e.g. --planner sla without role switching in this build
        print(f"   {name} did not start: {str(e).splitlines()[-1]}", flush=True)
        return {"name": name, "error": str(e)[-2000:]}
    recs = run.records
    ttft = np.array([r.ttft_s * 1e3 for r in recs])
    e2el = np.array([r.e2el_s * 1e3 for r in recs])
    out = np.array([max(1, r.generated_tokens) for r in recs])
    ok = attainment(ttft, tpot_ms(ttft, e2el, out), e2el, SLO(args.slo_ttft_ms, args.slo_tpot_ms))
    return {"name": name, "command": cmd, "ok": ok.tolist(), "timeline": timeline, "load_average": os.getloadavg(),
            "errors": sum(not r.success for r in recs), "planner_log": [
                ln for ln in log_tail.splitlines() if "planner" in ln][-100:],
            "requests": [r.as_dict() for r in recs]}


def per_phase(res: dict[str, Any], names: list[str]) -> dict[str, float]:
    ok = np.array(res["ok"], bool)
    out = {ph: float(ok[[n == ph for n in names]].mean()) for ph in dict.fromkeys(names)}
    out["overall"] = float(ok.mean())
    return out


def plot(path: str, runs: list[dict[str, Any]], names: list[str], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 1, figsize=(9, 7))
    phs = list(dict.fromkeys(names)) + ["overall"]
    w = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        att = r["attainment"]
        ax[0].bar(np.arange(len(phs)) + i * w, [att[p] for p in phs], w, label=r["name"])
    ax[0].set_xticks(np.arange(len(phs)) + w * (len(runs) - 1) / 2, phs)
    ax[0].set_ylabel("SLO attainment")
    ax[0].legend()
    # the fixed systems' roles are constant: only the planner's (or whatever switched) are drawn
    moving = [r for r in runs if len({tuple(sorted(x["roles"].items())) for x in r["timeline"]}) > 1]
    for r in moving:
        tl = r["timeline"]
        for role, ls in (("prefill", "-"), ("decode", "--"), ("colocated", ":")):
            ax[1].step([x["t"] for x in tl], [x["roles"].get(role, 0) for x in tl], ls, where="post", lw=1.5,
                       label=f"{r['name']} {role} (up)")
    for k in range(1, 3):
        ax[1].axvline(k * args.phase_s, color="grey", lw=0.5)
    ax[1].set_xlabel("seconds (phase boundaries in grey)")
    ax[1].set_ylabel("workers up per role\n(a switching worker is up in neither)")
    ax[1].legend(fontsize=7, ncol=3)
    fig.suptitle(f"shifting workload, SLO p90 TTFT {args.slo_ttft_ms:g} ms / TPOT {args.slo_tpot_ms:g} ms "
                 f"(attainment per request)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--systems", default="1p1d,2c,planner")
    ap.add_argument("--phase-s", type=float, default=45.0)
    ap.add_argument("--rate-short", type=float, default=1.0)
    ap.add_argument("--rate-long", type=float, default=0.5)
    ap.add_argument("--slo-ttft-ms", type=float, default=4000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=250.0)
    ap.add_argument("--interval-s", type=float, default=10.0)
    ap.add_argument("--cooldown-s", type=float, default=30.0)
    ap.add_argument("--profile", default=str(REPO / "bench/results/profile_demo_cpu.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--out", default=str(REPO / "bench/results/elastic_bench"))
    args = ap.parse_args()
    specs, names = workload(args)
    prompts = synth_prompts(specs, vocab_ids(args.model), args.seed)
    print(f"{len(specs)} requests in {len(phases(args))} phases of {args.phase_s:g} s", flush=True)
    runs = []
    for name in args.systems.split(","):
        r = run_system(name, args, specs, prompts)
        if "ok" in r:
            r["attainment"] = per_phase(r, names)
            print(f"   {name}: " + ", ".join(f"{k} {v:.0%}" for k, v in r["attainment"].items()), flush=True)
        runs.append(r)
    payload = {**header({k: v for k, v in vars(args).items() if k != "out"}),
               "command": "python bench/elastic_bench.py " + " ".join(sys.argv[1:]),
               "load_average": os.getloadavg(), "phases": names, "runs": runs}
    write_json(args.out + ".json", payload)
    done = [r for r in runs if "ok" in r]
    if done:
        plot(args.out + ".png", done, names, args)
    print(f"wrote {args.out}.json" + (f" and {args.out}.png" if done else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
