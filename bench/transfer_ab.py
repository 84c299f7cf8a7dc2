"""KV transfer throughput of two source trees, side by side in one run (before/after a change).

    .venv/bin/python bench/transfer_ab.py --before /tmp/before [--after .] [--rounds 3] \
        [--out bench/results/transfer_ab.json]

Each case (transport x cluster secret x model) runs `transfer_bench.transport_gbps` in a fresh
process per tree, the trees alternating (ABBA) round after round, so both see the same load on
a shared machine; a case's figures are its best repetition over all rounds: wall-clock GB/s, and GB per CPU-second
of the process holding both ends (less disturbed by other tenants than wall time). Make the "before" tree
with e.g. `git archive <commit> | tar -x -C /tmp/before`. Reference points (memcpy, crc32,
HMAC-SHA256) come from `transfer_bench`, measured in this process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import transfer_bench as tb  # noqa: E402

CASES = [(kind, secret, model, tokens) for model, tokens in (("demo", 2048), ("llama-3.1-8b", 512))
         for kind in ("tcp", "shm") for secret in (False, True)]

# Runs in the tree under test: its pdserve is imported first, then this tree's bench helpers.
CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import pdserve.config, pdserve.transfer  # the tree under test, cached before the bench adds its own root
sys.path.insert(0, sys.argv[2])
import transfer_bench as tb
kind, secret, model, tokens, reps = sys.argv[3], sys.argv[4] == "1", sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
loop = tb.RawLoopback()
r = tb.transport_gbps(kind, model, tokens, reps, loop, tb.SECRET if secret else None)
loop.close()
r["pdserve"] = pdserve.transfer.__file__
print("RESULT " + json.dumps(r))
"""


def run_case(tree: Path, kind: str, secret: bool, model: str, tokens: int, reps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(HERE), kind, "1" if secret else "0",
                          model, str(tokens), str(reps)], capture_output=True, text=True, env=env,
                         cwd=tree, timeout=600, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    assert Path(r["pdserve"]).resolve().is_relative_to(tree.resolve()), r["pdserve"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, type=Path, help="source tree of the baseline")
    ap.add_argument("--after", default=HERE.parent, type=Path, help="source tree of the change (default: this one)")
    ap.add_argument("--rounds", type=int, default=3, help="ABBA rounds per case")
    ap.add_argument("--reps", type=int, default=2, help="timed transfers per process")
    ap.add_argument("--out", default="bench/results/transfer_ab.json")
    args = ap.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}

    ref_bytes = 64 * 1024 * 1024
    reference = {"memcpy": tb.memcpy_gbps(ref_bytes, 5), "crc32": tb.crc32_gbps(ref_bytes, 5),
                 "hmac_sha256": tb.hmac_gbps(ref_bytes, 5)}
    tb.log("reference GB/s: " + ", ".join(f"{k} {v:.2f}" for k, v in reference.items()))
    cases = []
    for kind, secret, model, tokens in CASES:
        raw: dict[str, list[float]] = {"before": [], "after": []}
        raw_cpu: dict[str, list[float]] = {"before": [], "after": []}
        for rnd in range(args.rounds):
            order = ("before", "after") if rnd % 2 == 0 else ("after", "before")
            for side in order:
                r = run_case(trees[side], kind, secret, model, tokens, args.reps)
                raw[side] += r["seconds"]
                raw_cpu[side] += r["cpu_seconds"]
        nbytes = tb.CATALOG[model].kv_bytes_per_token() * tokens
        best = {side: nbytes / min(ts) / tb.GB for side, ts in raw.items()}
        per_cpu = {side: nbytes / min(ts) / tb.GB for side, ts in raw_cpu.items()}
        case = {"transport": kind, "secret": secret, "model": model, "tokens": tokens, "bytes": nbytes,
                "seconds": raw, "cpu_seconds": raw_cpu, "gbps": best, "gb_per_cpu_s": per_cpu,
                "after_over_before": best["after"] / best["before"],
                "cpu_after_over_before": per_cpu["after"] / per_cpu["before"]}
        cases.append(case)
        tb.log(f"{kind} secret={'yes' if secret else 'no '} {model} {tokens}: {best['before']:.2f} -> "
               f"{best['after']:.2f} GB/s ({case['after_over_before']:.2f}x), {per_cpu['before']:.2f} -> "
               f"{per_cpu['after']:.2f} GB/CPU-s ({case['cpu_after_over_before']:.2f}x)")

    print(f"\n{'transport':9s} {'secret':6s} {'model':13s} {'tokens':>6s} {'GB/s before':>11s} {'after':>6s} "
          f"{'ratio':>6s} {'GB/CPU-s before':>15s} {'after':>6s} {'ratio':>6s}")
    for c in cases:
        print(f"{c['transport']:9s} {'yes' if c['secret'] else 'no':6s} {c['model']:13s} {c['tokens']:6d} "
              f"{c['gbps']['before']:11.2f} {c['gbps']['after']:6.2f} {c['after_over_before']:6.2f} "
              f"{c['gb_per_cpu_s']['before']:15.2f} {c['gb_per_cpu_s']['after']:6.2f} "
              f"{c['cpu_after_over_before']:6.2f}")
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                    "load_avg": os.getloadavg()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "trees": {k: str(v) for k, v in trees.items()},
        "reference_gbps": reference, "cases": cases,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    tb.log(f"wrote {out}")


if __name__ == "__main__":
    main()
