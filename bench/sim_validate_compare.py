"""The simulator against real `pdserve bench compare` runs: winners per rate, goodput, TTFT/TPOT/ITL.

Inputs: a step profile from `pdserve profile` taken beside the real runs (the machine's speed drifts
with its load, so profile and runs are interleaved: profile, compare, profile, compare, profile),
and the compare JSONs (each mode, each rate, every request's arrival and lengths). The first
compare is the calibration workload: its lowest rate (requests mostly alone) gives the serving
overheads per mode (`simcompare.overheads_from`); every other compare is validation only.
Variants, each on every compare:
  before     the simulator as a new user runs it (README workflow): the profile alone, the decode
             attention cost as the engine had it before its grouping ("padded")
  profile    the profile alone, attention as the engine computes it now ("grouped")
  calibrated the same plus the serving overheads measured on the calibration run (a constant per
             step and per request, as `pdserve calibrate` measures them)
  scaled     the profile's step times times the slowdown measured on the calibration run (the
             factor that gives its real median TPOT: the machine's contention, a factor rather
             than a constant), plus the request overhead that gives its median TTFT
  load       as scaled, the factor times each run's load average over the calibration run's
             (the machine's contention moved between the runs of one sweep)
  measured   as calibrated, plus the prefill factors (`pdserve/bench/prefill_factors.py`): how much
             longer a served step with prefill work takes than the profile says, alone and while
             another worker of the host computes, read off the engine's own timing of each prompt's
             step in every request record of the calibration compare (all its rates: co-running
             needs load); inside the step, so a slow prefill stalls the decodes batched with it.
             The overheads are measured again with the factors in (the in-step part is no longer
             counted as a request overhead). The same factors measured on every other compare are
             recorded too (`prefill_factors_measured`), for the run-to-run spread; never used
             in a prediction.
  measured_r5  the round-5 model, for before/after: as measured without the co-running decode
             factor (decode-only steps as the profile has them whatever the host's other worker
             does); `measured` now also charges it (`corun_decode_factor`, read off the decode-only
             steps' token gaps of the same calibration compare)
  own_factors  a diagnostic, not a prediction: as measured, with each compare's prefill factors
             measured on that compare itself (how much of the error is the host's state drifting
             between runs rather than the model: identical runs of one command differ 4x in
             colocated goodput, `real_repeat_spread`).

    .venv/bin/python bench/sim_validate_compare.py --profile P.json REAL_longprompt.json REAL_chatbot.json

Writes bench/results/sim_validation_compare.json (+ .png): the inputs' commands and load averages,
the overheads, per variant, compare, rate and mode the real and simulated metrics and errors, and
`per_rate_goodput_error`: per compare, rate and mode the goodput error of measured_r5 and measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdserve.bench import simcompare as sc  # noqa: E402
from pdserve.bench.prefill_factors import prefill_factors_from  # noqa: E402
from pdserve.bench.report import header, write_json  # noqa: E402
from pdserve.bench.simcheck import fit_link, loadavg, register_link  # noqa: E402

KEYS = ("request_goodput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
        "median_itl_ms", "p99_itl_ms", "p99_max_itl_ms")


def variant_profile(profile: str, attention: str, overheads: dict[str, Any] | None) -> str:
    p = json.loads(Path(profile).read_text())
    p["attention"] = attention
    p["serving"] = overheads or {}
    return sc.temp_profile(p)


def diagnose(compare: dict[str, Any], profile: str) -> dict[str, Any]:
    """Per mode and rate: how much slower the real phases ran than the profile's fit of them
    (median real prefill phase / fit of that prompt alone; median real ITL / fit batch-1 step at
    the request's context), the phases' real means, and the real load average."""
    import numpy as np

    from pdserve.sim.profile import ProfiledModel

    fit = ProfiledModel.load(profile)
    out: dict[str, Any] = {}
    for mode, m in compare["modes"].items():
        rows = []
        for run in m["runs"]:
            ok = [r for r in run["requests"] if r.get("success")]
            pre = [r["timings"]["prefill"] / fit.prefill_time([r["prompt_tokens"]]) for r in ok if "prefill" in r["timings"]]
            itl = [float(np.median(r["itl_s"])) / fit.decode_time([r["prompt_tokens"] + len(r["itl_s"]) // 2])
                   for r in ok if r["itl_s"]]
            rows.append({"rate": run["rate"], "prefill_over_fit_median": float(np.median(pre)) if pre else None,
                         "itl_over_batch1_fit_median": float(np.median(itl)) if itl else None,
                         "phases_mean_ms": run["summary"].get("phases_mean_ms"),
                         "load_average": run["summary"].get("load_average")})
        out[mode] = rows
    return out


def summary_line(name: str, res: dict[str, Any]) -> str:
    s = res["scores"]
    agree = sum(s["winner_agrees"])
    parts = [f"{name}: winner agrees at {agree}/{len(s['winner_agrees'])} rates"]
    for mode in res["rates"][0]["modes"]:
        errs = ", ".join(f"{k.replace('_ms', '')} {s[mode][k]['median_abs']:.0%}" for k in KEYS
                         if s[mode][k]["median_abs"] is not None)
        parts.append(f"  {mode}: median |error| {errs}")
    return "\n".join(parts)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["compares"])
    panels = (("request_goodput", "goodput (req/s)"), ("median_tpot_ms", "median TPOT (ms)"),
              ("p99_max_itl_ms", "p99 worst gap (ms)"), ("median_ttft_ms", "median TTFT (ms)"))
    fig, axes = plt.subplots(len(names), len(panels), figsize=(4.2 * len(panels), 3.4 * len(names)), squeeze=False)
    colors = {"colocated": "tab:blue", "disaggregated": "tab:orange"}
    for row, name in enumerate(names):
        for col, (key, label) in enumerate(panels):
            ax = axes[row][col]
            for variant, style in (("measured_r5", ":"), ("measured", "--")):
                rows = result["variants"][variant][name]["rates"]
                for mode, c in colors.items():
                    xs = [r["rate"] for r in rows]
                    if variant == "measured":
                        ax.plot(xs, [r["modes"][mode]["real"][key] for r in rows], "-o", color=c, label=f"{mode} real")
                    ax.plot(xs, [r["modes"][mode]["sim"][key] for r in rows], style, marker="x", color=c,
                            label=f"{mode} sim ({variant})")
            ax.set_title(f"{name}: {label}", fontsize=9)
            ax.set_xlabel("rate (req/s)")
            if row == 0 and col == 0:
                ax.legend(fontsize=6)
    fig.suptitle("simulator vs real bench compare (2-core machine): solid real, dashed sim with the measured "
                 "host-sharing factors incl. the co-running decode one, dotted the same without it (round 5)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)


def per_rate(variants: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Per compare, rate and mode: real goodput, and each variant's simulated goodput and error;
    per compare, the count of rates within 15% and of winner agreement per variant."""
    out: dict[str, Any] = {}
    for comp in variants[names[0]]:
        rows = []
        for k, r in enumerate(variants[names[0]][comp]["rates"]):
            row: dict[str, Any] = {"rate": r["rate"]}
            for mode in r["modes"]:
                row[mode] = {"real": r["modes"][mode]["real"]["request_goodput"]}
                for v in names:
                    m = variants[v][comp]["rates"][k]["modes"][mode]
                    row[mode][v] = {"sim": m["sim"]["request_goodput"], "error": m["error"]["request_goodput"]}
            row["winner_agrees"] = {v: variants[v][comp]["rates"][k]["winner"]["real"]
                                    == variants[v][comp]["rates"][k]["winner"]["sim"] for v in names}
            rows.append(row)
        counts = {v: {"winner_agrees": sum(x["winner_agrees"][v] for x in rows),
                      **{mode: sum(abs(x[mode][v]["error"] or 0) <= 0.15 if x[mode][v]["error"] is not None
                                   else x[mode][v]["sim"] == 0 for x in rows)
                         for mode in variants[names[0]][comp]["rates"][0]["modes"]}, "of": len(rows)}
                  for v in names}
        out[comp] = {"rates": rows, "counts": counts}
    return out


def repeat_spread(compares: dict[str, Any]) -> list[dict[str, Any]]:
    """The real runs' own noise: for compares of the same command (same config: the same requests),
    per rate and mode each one's goodput over the first one's."""
    out = []
    names = list(compares)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if compares[a]["config"] != compares[b]["config"]:
                continue
            rows = []
            for k, run in enumerate(compares[a]["modes"]["colocated"]["runs"]):
                rows.append({"rate": run["rate"], **{
                    m: {"goodput": [compares[n]["modes"][m]["runs"][k]["summary"]["request_goodput"] for n in (a, b)]}
                    for m in compares[a]["modes"]}})
                for m in compares[a]["modes"]:
                    ga, gb = rows[-1][m]["goodput"]
                    rows[-1][m]["second_over_first"] = gb / ga if ga else None
            out.append({"compares": [a, b], "rates": rows})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compares", nargs="+", help="compare JSONs; the first is the calibration workload")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--profile-beside", action="append", default=[], help="another profile taken between the runs (recorded)")
    ap.add_argument("--transfer", default="bench/results/transfer.json")
    ap.add_argument("--calibrate-rate-index", type=int, default=0)
    ap.add_argument("--out", default="bench/results/sim_validation_compare.json")
    args = ap.parse_args()
    t0 = time.monotonic()
    link_fit = fit_link(Path(args.transfer), "demo")
    link = register_link(link_fit)
    compares = {Path(p).stem: sc.load(p) for p in args.compares}
    first = next(iter(compares))
    grouped = variant_profile(args.profile, "grouped", None)
    overheads = sc.overheads_from(compares[first], grouped, link, args.calibrate_rate_index)
    slowdown = sc.slowdown_from(compares[first], grouped, link, args.calibrate_rate_index)
    factors = {name: prefill_factors_from(c, grouped, sc.prefill_budgets(c)) for name, c in compares.items()}
    measured = sc.overheads_from(compares[first], grouped, link, args.calibrate_rate_index, factors[first])
    r5_factors = {m: {k: v for k, v in f.items() if k != "corun_decode_factor"} for m, f in factors[first].items()}
    measured_r5 = sc.overheads_from(compares[first], grouped, link, args.calibrate_rate_index, r5_factors)
    paths: dict[str, Any] = {"before": variant_profile(args.profile, "padded", None), "profile": grouped,
                             "calibrated": variant_profile(args.profile, "grouped", overheads),
                             "scaled": {m: s.pop("profile") for m, s in slowdown.items()},
                             "measured_r5": variant_profile(args.profile, "grouped", measured_r5),
                             "measured": variant_profile(args.profile, "grouped", measured)}
    variants: dict[str, Any] = {}
    load_factors: dict[str, Any] = {}
    try:
        for v, path in paths.items():
            variants[v] = {name: sc.predict(c, path, link) for name, c in compares.items()}
        variants["load"] = {}
        for name, c in compares.items():
            ls = sc.LoadScaled(c, grouped, {m: {k: x for k, x in s.items() if k != "profile"} | {}
                                            for m, s in slowdown.items()}, compares[first], args.calibrate_rate_index)
            try:
                variants["load"][name] = sc.predict(c, ls, link)
                load_factors[name] = ls.factors
            finally:
                ls.close()
        variants["own_factors"] = {}
        for name, c in compares.items():
            own = {sc.MODES[m]: {**measured[sc.MODES[m]], **{k: factors[name][m][k] for k in sc.FACTOR_KEYS}}
                   for m in c["modes"]}
            path = variant_profile(args.profile, "grouped", own)
            try:
                variants["own_factors"][name] = sc.predict(c, path, link)
            finally:
                Path(path).unlink()
    finally:
        for path in paths.values():
            for p in [path] if isinstance(path, str) else path.values():
                Path(p).unlink()
    lines = []
    for v, per in variants.items():
        for name, res in per.items():
            lines.append(f"[{v}] {name} ({'calibration' if name == first else 'validation'})")
            lines.append(sc.format_table(res))
            lines.append(summary_line(v, res))
            lines.append("")
    table = "\n".join(lines)
    profiles = {p: {k: v for k, v in json.loads(Path(p).read_text()).items() if k not in ("prefill", "decode")}
                for p in [args.profile, *args.profile_beside]}
    payload = {**header({"compares": args.compares, "profile": args.profile}),
               "command": "python " + " ".join(sys.argv), "load_average_at_write": loadavg(),
               "wall_s": time.monotonic() - t0, "link": link_fit, "serving_overheads": overheads, "slowdown": slowdown, "load_factors": load_factors,
               "serving_overheads_measured": measured, "serving_overheads_measured_r5": measured_r5,
               "prefill_factors_measured": factors,
               "per_rate_goodput_error": per_rate(variants, ("measured_r5", "measured")),
               "calibrated_on": f"{first}: overheads at rate index {args.calibrate_rate_index}, "
                                "prefill factors (variant measured) over all its rates",
               "held_out": [n for n in compares if n != first],
               "profiles": profiles,
               "compares": {name: {"command": c.get("command"), "date": c.get("date"),
                                   "load_average_end": c.get("load_average_end"),
                                   "load_average_per_run": {m: [r["summary"].get("load_average") for r in c["modes"][m]["runs"]]
                                                            for m in c["modes"]}}
                            for name, c in compares.items()},
               "real_repeat_spread": repeat_spread(compares),
               "variants": variants, "table": table,
               "diagnostics": {name: diagnose(c, args.profile) for name, c in compares.items()}}
    write_json(args.out, payload)
    plot(payload, Path(args.out).with_suffix(".png"))
    print(table)
    print(f"wrote {args.out} and its .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
