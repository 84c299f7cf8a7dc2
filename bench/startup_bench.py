"""Process start-up and stop: a worker's time (and CPU) to READY, `pdserve up`'s time to /health and
to exit after SIGTERM, for two source trees side by side (interleaved, `--repeats` rounds).

    .venv/bin/python bench/startup_bench.py --tree before=/tmp/old-checkout --tree after=. \\
        [--repeats 5] [--out bench/results/startup_cpu.json]

Each tree runs as `python -m pdserve.cli` in it, with PYTHONPATH set to it (the same interpreter
and packages; `-m` puts the working directory first on the path). The demo model (dummy weights), `--threads 1`. A worker: `serve --role decode
--internal`, wall seconds from the spawn to its READY line and the CPU seconds it used by then
(user + system, from /proc: less sensitive to a loaded machine than the wall time). `up --prefill 1
--decode 1`: wall seconds to /health answering 200, then, idle, from SIGTERM to the process's exit
(it waits for its workers). The peer of each figure is the other tree on the same machine in the
same run; there is no hardware limit for start-up (mostly imports and the model build).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _env(tree: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def worker_to_ready(tree: str) -> dict[str, float]:
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", "--role", "decode", "--internal", "--model",
                          "demo", "--threads", "1", "--host", "127.0.0.1", "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=_env(tree), cwd=tree, start_new_session=True)
    assert p.stdout is not None
    for line in p.stdout:
        if line.startswith("READY"):
            break
    out = {"wall_s": time.monotonic() - t0, "cpu_s": _cpu_s(p.pid)}
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return out


def up_ready_and_stop(tree: str) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--model", "demo", "--prefill", "1", "--decode",
                          "1", "--threads", "1", "--port", str(port)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=_env(tree), cwd=tree, start_new_session=True)
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1, trust_env=False).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if p.poll() is not None or time.monotonic() - t0 > 300:
            raise RuntimeError(f"up did not become ready (exit status {p.returncode})")
        time.sleep(0.05)
    ready = time.monotonic() - t0
    time.sleep(1.0)
    t1 = time.monotonic()
    os.killpg(p.pid, signal.SIGTERM)
    p.wait(timeout=120)
    return {"ready_s": ready, "stop_s": time.monotonic() - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (twice)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/startup_cpu.json")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    raw: dict[str, dict[str, list[float]]] = {n: {"worker_wall_s": [], "worker_cpu_s": [], "up_ready_s": [],
                                                  "up_stop_s": []} for n in trees}
    loads = [os.getloadavg()]
    for r in range(args.repeats):
        for name, tree in trees.items():
            w = worker_to_ready(tree)
            u = up_ready_and_stop(tree)
            raw[name]["worker_wall_s"].append(w["wall_s"])
            raw[name]["worker_cpu_s"].append(w["cpu_s"])
            raw[name]["up_ready_s"].append(u["ready_s"])
            raw[name]["up_stop_s"].append(u["stop_s"])
            loads.append(os.getloadavg())
            print(f"round {r} {name}: worker {w['wall_s']:.2f}s ({w['cpu_s']:.2f} cpu), up ready {u['ready_s']:.2f}s, "
                  f"stop {u['stop_s']:.2f}s", flush=True)
    medians = {n: {k: round(statistics.median(v), 3) for k, v in m.items()} for n, m in raw.items()}
    names = list(trees)
    ratios = {k: round(medians[names[1]][k] / medians[names[0]][k], 3) for k in medians[names[0]]} if len(names) == 2 else {}
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "model": "demo", "trees": trees,
              "repeats": args.repeats, "loadavg": loads, "raw": raw, "medians": medians,
              f"ratio_{names[-1]}_over_{names[0]}": ratios,
              "note": "shared machine, loaded by other work (see loadavg): compare the trees, interleaved, not absolutes"}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"medians": medians, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
