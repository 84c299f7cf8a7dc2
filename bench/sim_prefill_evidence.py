"""Why the simulator under-predicted colocated stalls: the candidate causes, each against recorded data.

    .venv/bin/python bench/sim_prefill_evidence.py [--profile P.json] [--engine E.json] COMPARE.json ...

No real cluster is needed; it reads committed results only:
  mixed_step_cost   the engine bench's offline run (`offline_breakdown.runs.budget[*].step_records`:
                    prefill tokens, decodes, seconds per step) replayed through the same
                    `ColocatedScheduler` (the composition must match the record, step for step)
                    and each step timed by the profile's model: real / model. Alone on the machine.
  client_vs_engine  per compare, colocated: a decode's client-side gap across a prompt's step minus
                    the engine's own timing of that step (`timings.prefill`): time outside the step
                    (worker loop, router, client), for decodes with a token as the step ended and
                    none while it ran (so >= -5 ms by construction; the positive side is the finding).
  prefill_factors   per compare and mode: the served prompt step over the model's, alone and
                    co-running (`pdserve/bench/prefill_factors.py`).
  decode_steps      per compare and mode: decode-only steps over the model's, alone and co-running
                    (the same host effect on decode steps; now modelled: corun_decode_factor).
Writes bench/results/sim_prefill_evidence_r5.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.bench.prefill_factors import TOL_S, prefill_factors_from, token_times  # noqa: E402
from pdserve.bench.report import header, write_json  # noqa: E402
from pdserve.bench.simcheck import loadavg  # noqa: E402
from pdserve.bench.simcompare import prefill_budgets  # noqa: E402
from pdserve.config.engine import SchedulerConfig  # noqa: E402
from pdserve.sched.block_manager import BlockManager  # noqa: E402
from pdserve.sched.colocated import ColocatedScheduler  # noqa: E402
from pdserve.sched.request import Request  # noqa: E402
from pdserve.sim.instance import SimInstance  # noqa: E402
from pdserve.sim.network import Port  # noqa: E402
from pdserve.sim.profile import ProfiledModel  # noqa: E402

NO_TOKEN_SLACK_S = 0.005  # the engine's step start vs the client's view of the token before it


def mixed_step_cost(engine: dict[str, Any], model: ProfiledModel) -> list[dict[str, Any]]:
    lens, max_tokens = engine["prompts"]["lengths"], engine["prompts"]["max_tokens"]
    out = []
    for rep, run in enumerate(engine["offline_breakdown"]["runs"]["budget"]):
        sched = ColocatedScheduler(SchedulerConfig(max_num_batched_tokens=run["max_num_batched_tokens"], max_num_seqs=64),
                                   BlockManager(8192, 16, enable_prefix_caching=False))
        for i, n in enumerate(lens):
            sched.add_request(Request(str(i), [1] * n, max_tokens, 0.0), 0.0)
        inst = SimInstance("replay", "colocated", sched, model, Port("replay", 1e9))
        mixed, decode = [], []
        for prefill_tokens, decodes, seconds in run["step_records"]:
            step = sched.schedule(0.0)
            n_dec = sum(1 for c in step.chunks if c.num_tokens == 1 and c.sample and c.request.num_computed_tokens)
            n_pre = sum(c.num_tokens for c in step.chunks) - n_dec
            if (n_pre, n_dec) != (prefill_tokens, decodes):
                raise AssertionError(f"replay diverged: {(n_pre, n_dec)} vs record {(prefill_tokens, decodes)}")
            (mixed if n_pre else decode).append(seconds / inst.step_time(step))
            sched.update(step, {c.request.request_id: 1 for c in step.chunks}, 0.0)
        out.append({"repeat": rep, "steps": len(run["step_records"]),
                    "prefill_steps_real_over_model": [round(x, 3) for x in mixed],
                    "decode_steps_real_over_model_median": float(np.median(decode))})
    return out


def client_vs_engine(compare: dict[str, Any]) -> dict[str, Any]:
    diffs = []
    for run in compare["modes"]["colocated"]["runs"]:
        tl = token_times(run["requests"])
        for i, (r, t) in tl.items():
            pre = (r.get("timings") or {}).get("prefill")
            if pre is None:
                continue
            for o, (_, to) in tl.items():
                k = np.flatnonzero(np.abs(to[1:] - t[0]) < TOL_S)
                # batched with the prompt: a token as it ended and none while it ran (a request on
                # the other worker streams meanwhile); what the gap holds beyond the step is free
                if o != i and k.size and to[k[0]] <= t[0] - pre + NO_TOKEN_SLACK_S:
                    diffs.append(to[k[0] + 1] - to[k[0]] - pre)
    a = np.asarray(diffs) * 1e3
    return {"n": int(a.size), "median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90))}


def decode_steps(compare: dict[str, Any], mode: str, model: ProfiledModel) -> dict[str, Any]:
    """Decode-only steps (a token pair of a request with no first token at its end): real over the
    profile's decode step of the batch (requests with tokens at both ends), co-running when another
    request streamed inside it or a prompt step (`timings.prefill`) overlapped it. Not modelled."""
    res: dict[bool, list[float]] = {True: [], False: []}
    for run in compare["modes"][mode]["runs"]:
        tl = token_times(run["requests"])
        prompts = [(t[0] - r["timings"]["prefill"], t[0]) for r, t in tl.values() if "prefill" in (r.get("timings") or {})]
        seen: set[float] = set()
        for _, t in tl.values():
            for a, b in zip(t[1:-1], t[2:], strict=True):
                if round(b, 3) in seen:
                    continue
                ctx, first, inside = [], False, False
                for ro, to in tl.values():
                    hit = np.flatnonzero(np.abs(to - b) < TOL_S)
                    if hit.size and hit[0] == 0:
                        first = True
                    elif hit.size and abs(to[hit[0] - 1] - a) < TOL_S:
                        ctx.append(ro["prompt_tokens"] + int(hit[0]))
                        continue
                    inside = inside or bool(np.count_nonzero((to > a + TOL_S) & (to < b - TOL_S)))
                if first or not ctx:
                    continue
                seen.add(round(b, 3))
                co = inside or any(s < b and e > a for s, e in prompts)
                res[co].append((b - a) / model.decode_time(ctx))
    return {k: {"steps": len(v), "real_over_model_median": float(np.median(v)) if v else None}
            for k, v in (("alone", res[False]), ("corun", res[True]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compares", nargs="+")
    ap.add_argument("--profile", default="bench/results/sim_validation_profile_quiet_r4.json")
    ap.add_argument("--engine", default="bench/results/engine_cpu_quiet_r4.json")
    ap.add_argument("--out", default="bench/results/sim_prefill_evidence_r5.json")
    args = ap.parse_args()
    model = ProfiledModel.load(args.profile)
    compares = {Path(p).stem: json.loads(Path(p).read_text()) for p in args.compares}
    payload = {**header({"compares": args.compares, "profile": args.profile, "engine": args.engine}),
               "command": "python " + " ".join(sys.argv), "load_average_at_write": loadavg(),
               "mixed_step_cost": mixed_step_cost(json.loads(Path(args.engine).read_text()), model),
               "client_vs_engine": {n: client_vs_engine(c) for n, c in compares.items()},
               "prefill_factors": {n: prefill_factors_from(c, args.profile, prefill_budgets(c)) for n, c in compares.items()},
               "decode_steps": {n: {m: decode_steps(c, m, model) for m in c["modes"]} for n, c in compares.items()}}
    write_json(args.out, payload)
    print(json.dumps({k: payload[k] for k in ("mixed_step_cost", "client_vs_engine", "prefill_factors", "decode_steps")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
