"""Soak: the leak test's scenario (tests/test_leaks.py), repeated on one long-lived cluster.

    .venv/bin/python bench/soak.py [--rounds 10] [--requests 1000] [--concurrency 32]
                                   [--corrupt 0.02] [--cut 0.01] [--out bench/results/soak.json]

One real `pdserve up` cluster (1 prefill + 2 decode workers, TCP KV transfer with injected faults:
each KV chunk is corrupted with probability --corrupt and its link cut with probability --cut)
serves --rounds rounds of --requests streamed requests (prompts of 3-40 random token ids,
max_tokens 1-8, greedy, ignore_eos), --concurrency at a time. About 20% of the clients hang up:
as soon as the status line arrives or after 1-3 chunks. After each round the script waits until
every worker's free KV blocks are back at their value before the soak (--settle seconds at most;
well under the decode workers' 30 s reservation expiry, which must not be what frees them) and
records, per round:

  leaked_blocks   per worker, blocks still missing after --settle s (the goal: 0)
  settle_s        how long the blocks took to come back
  stuck           requests that got neither a completion nor an error within --stuck-after s
  failed          requests answered with an error (faults are retried or fall back: the goal is 0)
  worker_restarts worker processes that started again (a READY line beyond the first of each)
  workers_down    workers whose `up` gauge is 0 after the round
  expired         decode reservations that expired (nobody released them: each is a leak)
  faults          attempts the router retried (all, and those after a failed KV transfer)

The model is the tests' tiny random-weight Llama (made on the spot) unless --model names one.
Results, with machine, command, date and the raw per-round numbers, go to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

URL_RE = re.compile(r"serving \S+ at (http://[0-9.:]+)/v1")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the cluster ------------------------------------------------------------------------------
class Cluster:
    """`pdserve up` in its own process group; its combined output goes to a file we can scan."""

    def __init__(self, model: str, config: Path, prefill: int, decode: int) -> None:
        self.log_path = config.parent / "up.log"
        self.args = ["up", "--model", model, "--threads", "1", "--port", "0", "--config", str(config),
                     "--prefill", str(prefill), "--decode", str(decode)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", *self.args], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)
        self.url = ""

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pdserve up exited ({self.proc.returncode}):\n{self.output()[-3000:]}")
            m = URL_RE.search(self.output())
            if m:
                self.url = m.group(1)
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"pdserve up not ready within {timeout:.0f}s:\n{self.output()[-3000:]}")

    def gauge(self, name: str) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {s.labels["worker"]: s.value for fam in text_string_to_metric_families(text)
                if fam.name == f"pdserve:worker_{name}" for s in fam.samples}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers that outlived their parent
        except ProcessLookupError:
            pass


# ---- one round of requests --------------------------------------------------------------------
def plan(n: int, seed: int) -> list[tuple[list[int], int, int | None]]:
    """(prompt, max_tokens, chunks read before hanging up or None), as in tests/test_leaks.py."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, 300) for _ in range(rng.choice([3, 9, 17, 33, 40]))]
        abort_after = rng.choice([0, 1, 2, 3]) if rng.random() < 0.2 else None
        out.append((prompt, rng.randint(1, 8), abort_after))
    return out


async def drive(url: str, model: str, requests: list[tuple[list[int], int, int | None]], concurrency: int,
                stuck_after: float) -> dict:
    counts = {"done": 0, "aborted": 0, "failed": 0, "stuck": 0}
    failures: list[str] = []
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    t0 = time.monotonic()
    n = len(requests)

    async with httpx.AsyncClient(timeout=stuck_after + 30,
                                 limits=httpx.Limits(max_connections=concurrency + 8)) as client:
        async def one(prompt: list[int], max_tokens: int, abort_after: int | None) -> str:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                if abort_after == 0:
                    return "aborted"  # hang up as soon as the status line arrives
                lines, chunks = [], 0
                async for line in r.aiter_lines():
                    lines.append(line)
                    if line.startswith("data: {"):
                        chunks += 1
                        if abort_after is not None and chunks >= abort_after:
                            return "aborted"  # hang up mid-stream
                    if line == "data: [DONE]":
                        if r.status_code == 200 and not any('"error"' in x for x in lines):
                            return "done"
                failures.append(f"{r.status_code}: {' | '.join(lines)[-300:]}")
                return "failed"

        async def guarded(req: tuple[list[int], int, int | None]) -> None:
            async with sem:
                t = time.monotonic()
                try:
                    outcome = await asyncio.wait_for(one(*req), stuck_after)
                except TimeoutError:
                    outcome = "stuck"  # neither a completion nor an error in time
                except httpx.HTTPError as e:
                    outcome = "failed"
                    failures.append(f"{type(e).__name__}: {e}")
                latencies.append(time.monotonic() - t)
                counts[outcome] += 1
                total = sum(counts.values())
                if total % 100 == 0 or total == n:
                    print(f"    {total}/{n} requests {counts} after {time.monotonic() - t0:.1f}s", flush=True)

        await asyncio.gather(*(guarded(r) for r in requests))
    latencies.sort()
    return {**counts, "seconds": round(time.monotonic() - t0, 2), "failures_sample": failures[:5],
            "latency_p50_s": round(latencies[len(latencies) // 2], 3), "latency_max_s": round(latencies[-1], 3),
            "over_20s": sum(x > 20 for x in latencies)}


def settle(cluster: Cluster, start: dict[str, float], timeout: float) -> tuple[float | None, dict[str, float]]:
    """Seconds until every worker's free blocks are back (None if not within `timeout`), and
    the blocks still missing per worker."""
    t0 = time.monotonic()
    while True:
        now = cluster.gauge("kv_free_blocks")
        missing = {w: start[w] - now.get(w, 0.0) for w in start if now.get(w, 0.0) != start[w]}
        if not missing:
            return round(time.monotonic() - t0, 2), {}
        if time.monotonic() - t0 > timeout:
            return None, missing
        time.sleep(0.25)


def scan(text: str) -> dict[str, int | list[str]]:
    """What the cluster's log says happened (cumulative since start)."""
    lines = text.splitlines()
    return {
        "ready_lines": sum("READY " in ln and " pid=" in ln for ln in lines),  # one per worker start
        "expired": [ln.split("for ")[1].split(" ")[0] for ln in lines if "expired: its KV" in ln],
        "retried_attempts": sum(re.search(r"attempt \d+ failed", ln) is not None for ln in lines),
        "transfer_retries": sum(re.search(r"attempt \d+ failed .*KV transfer failed", ln) is not None
                                for ln in lines),
        "tracebacks": sum("Traceback" in ln for ln in lines),
    }


def commit() -> str:
    """The checkout's commit, with "+dirty" when tracked files differ from it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD")
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict[str, str | int]:
    cpu = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count() or 0, "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="rounds of requests (default 10)")
    ap.add_argument("--requests", type=int, default=1000, help="requests per round (default 1000)")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    ap.add_argument("--corrupt", type=float, default=0.02, help="probability a KV chunk is corrupted (default 0.02)")
    ap.add_argument("--cut", type=float, default=0.01, help="probability a KV link is cut after a chunk (default 0.01)")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds to wait for blocks to come back (default 15)")
    ap.add_argument("--stuck-after", type=float, default=90.0,
                    help="a request with no completion and no error after this many seconds is stuck (default 90)")
    ap.add_argument("--seed", type=int, default=6, help="seed of the first round; round i uses seed+i (default 6)")
    ap.add_argument("--model", default="", help="model folder or catalog name (default: the tests' tiny Llama)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"), help="where the JSON goes")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="pdserve-soak-"))
    model = args.model
    if not model:
        from tests.tiny_models import make_tiny_model

        model = str(make_tiny_model("llama", tmp / "llama"))
    config = tmp / "cluster.yaml"
    config.write_text(f"transfer: {{fault_corrupt_prob: {args.corrupt}, fault_cut_prob: {args.cut}}}\n")
    result: dict = {
        "benchmark": "soak", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit(), "machine": machine(),
        "model": args.model or "tests/tiny_models.py llama (2 layers, random weights)",
        "cluster": {"prefill": 1, "decode": 2, "transport": "tcp", "fault_corrupt_prob": args.corrupt,
                    "fault_cut_prob": args.cut},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model")}, "rounds": [],
    }
    log(f"starting a 1P2D cluster ({model}), faults: corrupt {args.corrupt}, cut {args.cut}")
    cluster = Cluster(model, config, prefill=1, decode=2)
    try:
        cluster.wait_ready()
        start = cluster.gauge("kv_free_blocks")
        log(f"cluster at {cluster.url}; free KV blocks per worker: {start}")
        before = scan(cluster.output())
        for i in range(args.rounds):
            log(f"round {i + 1}/{args.rounds}: {args.requests} requests, seed {args.seed + i}")
            stats = asyncio.run(drive(cluster.url, model, plan(args.requests, args.seed + i), args.concurrency,
                                      args.stuck_after))
            settle_s, missing = settle(cluster, start, args.settle)
            after = scan(cluster.output())
            up = cluster.gauge("up")
            rnd = {
                "round": i + 1, "seed": args.seed + i, **stats,
                "leaked_blocks": missing, "leaked_total": sum(missing.values()), "settle_s": settle_s,
                "worker_restarts": int(after["ready_lines"]) - int(before["ready_lines"]),
                "workers_down": sorted(w for w, v in up.items() if v != 1),
                "expired": list(after["expired"])[len(before["expired"]):],  # type: ignore[arg-type]
                "faults": {k: int(after[k]) - int(before[k])  # type: ignore[call-overload]
                           for k in ("retried_attempts", "transfer_retries", "tracebacks")},
            }
            if missing:  # name what holds them: wait past the 30 s expiry and see what the log says
                time.sleep(35)
                rnd["leaked_after_expiry"] = {w: start[w] - v for w, v in cluster.gauge("kv_free_blocks").items()
                                              if v != start[w]}
                rnd["expired"] = list(scan(cluster.output())["expired"])[len(before["expired"]):]  # type: ignore[arg-type]
            before = scan(cluster.output())
            result["rounds"].append(rnd)
            log(f"round {i + 1}: done {stats['done']}, aborted {stats['aborted']}, failed {stats['failed']}, "
                f"stuck {stats['stuck']}; leaked {rnd['leaked_total']:.0f} blocks (back after {settle_s} s); "
                f"restarts {rnd['worker_restarts']}, down {rnd['workers_down']}, expired {len(rnd['expired'])}; "
                f"faults {rnd['faults']}")
        r = httpx.post(cluster.url + "/v1/completions", json={"model": model, "prompt": [5, 6, 7], "max_tokens": 4,
                                                               "temperature": 0}, timeout=60)
        result["serves_after"] = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        cluster.stop()
    rounds = result["rounds"]
    result["totals"] = {
        "requests": sum(r["done"] + r["aborted"] + r["failed"] + r["stuck"] for r in rounds),
        **{k: sum(r[k] for r in rounds) for k in ("done", "aborted", "failed", "stuck", "over_20s",
                                                   "worker_restarts")},
        "leaked_blocks": sum(r["leaked_total"] for r in rounds),
        "expired_reservations": sum(len(r["expired"]) for r in rounds),
        "retried_attempts": sum(r["faults"]["retried_attempts"] for r in rounds),
        "transfer_retries": sum(r["faults"]["transfer_retries"] for r in rounds),
        "tracebacks": sum(r["faults"]["tracebacks"] for r in rounds),
        "max_settle_s": max((r["settle_s"] or float("inf") for r in rounds), default=0.0),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    t = result["totals"]
    log(f"{t['requests']} requests in {len(rounds)} rounds: leaked {t['leaked_blocks']:.0f} blocks, "
        f"stuck {t['stuck']}, failed {t['failed']}, worker restarts {t['worker_restarts']}, "
        f"expired reservations {t['expired_reservations']}; wrote {out}")
    ok = (t["leaked_blocks"] == 0 and t["stuck"] == 0 and t["failed"] == 0 and t["worker_restarts"] == 0
          and result.get("serves_after"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
