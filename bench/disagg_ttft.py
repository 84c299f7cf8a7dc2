"""TTFT that disaggregation adds over colocated serving, on an idle system, side by side in one run.

    .venv/bin/python bench/disagg_ttft.py [--n 10] [--warmup 2] [--lengths 512 2040]
                                          [--shm/--no-shm] [--out bench/results/disagg_ttft.json]

Real `pdserve up` processes: a colocated cluster (1 colocated worker) stays up for the whole run;
the disaggregated clusters (1 prefill + 1 decode worker) are started one at a time beside it, so at
most two clusters exist at once on this 2-core machine:

  disagg_tcp_wait50   defaults: the prefill batcher waits up to max_wait_ms=50 for a fuller batch
                      (by design; on an idle system that wait is pure added TTFT)
  disagg_tcp_nowait   prefill.max_wait_ms=0 (YAML --config): the cost of disaggregation itself
  disagg_shm_nowait   as above over the shm transport

Requests go one at a time (idle system), alternating between the colocated cluster and the
disaggregated one with the same random prompt (token ids in [3, 3900), fresh per request, so no
prefix cache hits); the order within each pair flips every round. Client TTFT is the time from
sending the request to the first SSE data chunk that carries a choice (the frontend skips tokens
that decode to empty text, so this is the first *visible* token; server phase timings from the
last chunk are recorded too). Each disaggregated mode is compared with the colocated requests
interleaved with it: median difference and ratio. `transfer` (decode side: KV arrival after the
first token was already sent) is reported separately: disaggregated TTFT does not wait for it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdserve.config import CATALOG  # noqa: E402

# This tree's pdserve, run by the interpreter running the bench (a venv's entry point may be elsewhere).
PDSERVE = [sys.executable, "-m", "pdserve.cli"]
MODEL = "demo"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, name: str, args: list[str], yaml_text: str | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.cfg_path = None
        if yaml_text is not None:
            fd, self.cfg_path = tempfile.mkstemp(suffix=".yaml", prefix=f"pdserve-{name}-")
            os.write(fd, yaml_text.encode())
            os.close(fd)
            args = ["--config", self.cfg_path, *args]
        self.cmd = [*PDSERVE, "up", "--model", MODEL, *args, "--port", str(self.port), "--threads", "1"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    def display_cmd(self) -> str:
        cmd = " ".join(self.cmd[1:]).replace(str(self.port), "PORT")
        if self.cfg_path:
            cmd = cmd.replace(self.cfg_path, "CFG.yaml")
        return "pdserve " + cmd

    def start(self, timeout: float = 240.0) -> None:
        log(f"starting {self.name}: {self.display_cmd()}")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=ROOT)
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if "serving" in line and "/v1" in line:
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited rc={self.proc.returncode}:\n" + "\n".join(self.lines[-30:]))
            if ready.is_set():
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        log(f"{self.name} ready on :{self.port} in {time.perf_counter() - t0:.1f}s")
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} not ready in {timeout}s:\n" + "\n".join(self.lines[-30:]))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no exit 30s after SIGTERM; killing pid {self.proc.pid}")
                self.proc.kill()
                self.proc.wait()
            log(f"stopped {self.name} (rc={self.proc.returncode})")
        if self.cfg_path:
            try:
                os.unlink(self.cfg_path)
            except OSError:
                pass


def one_request(client: httpx.Client, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.0}
    rec: dict = {"ttft_s": None, "ttft_text_s": None, "e2e_s": None, "chunks": 0, "timings": None, "error": None}
    start = time.perf_counter()
    try:
        with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:300]}"
                return rec
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                now = time.perf_counter() - start
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:
                    rec["error"] = str(ev["error"])[:300]
                    return rec
                choices = ev.get("choices") or []
                if choices:
                    rec["chunks"] += 1
                    if rec["ttft_s"] is None:
                        rec["ttft_s"] = now
                    if rec["ttft_text_s"] is None and any(c.get("text") for c in choices):
                        rec["ttft_text_s"] = now
                if "timings" in ev:
                    t = ev["timings"]
                    t = t[0] if isinstance(t, list) else t
                    rec["timings"] = {k: float(v) for k, v in t.items()}
                rec["e2e_s"] = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    return rec


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def p90(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.percentile(xs, 90)) if xs else None


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="measured requests per cluster and length")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2040])
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--shm", action=argparse.BooleanOptionalAction, default=True,
                    help="also run disagg_shm_nowait")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/disagg_ttft.json"))
    args = ap.parse_args()

    nowait_yaml = "prefill:\n  max_wait_ms: 0\n"
    modes = [
        ("disagg_tcp_wait50", ["--prefill", "1", "--decode", "1", "--transport", "tcp"], None,
         "1 prefill + 1 decode worker, tcp, default prefill.max_wait_ms=50 (batcher waits for a fuller batch)"),
        ("disagg_tcp_nowait", ["--prefill", "1", "--decode", "1", "--transport", "tcp"], nowait_yaml,
         "1 prefill + 1 decode worker, tcp, prefill.max_wait_ms=0 (YAML --config)"),
    ]
    if args.shm:
        modes.append(("disagg_shm_nowait", ["--prefill", "1", "--decode", "1", "--transport", "shm"], nowait_yaml,
                      "1 prefill + 1 decode worker, shm, prefill.max_wait_ms=0 (YAML --config)"))

    kv_per_tok = CATALOG[MODEL].kv_bytes_per_token()
    rng = np.random.default_rng(args.seed)
    colo = Cluster("colocated", ["--colocated", "1", "--prefill", "0", "--decode", "0"])
    records: list[dict] = []
    clusters_meta = {"colocated": {"command": colo.display_cmd(),
                                   "what": "1 colocated worker (prefill+decode in one engine)"}}
    t_run = time.perf_counter()
    try:
        colo.start()
        for name, flags, yaml_text, what in modes:
            dis = Cluster(name, flags, yaml_text)
            clusters_meta[name] = {"command": dis.display_cmd(), "what": what, "config_yaml": yaml_text}
            dis.start()
            try:
                with httpx.Client(timeout=httpx.Timeout(300.0)) as client:
                    for L in args.lengths:
                        for i in range(args.warmup + args.n):
                            prompt = rng.integers(3, 3900, size=L).tolist()
                            pair = [(colo, "colocated"), (dis, name)]
                            if i % 2:
                                pair.reverse()
                            line = []
                            for cl, label in pair:
                                rec = one_request(client, cl.url, prompt, args.max_tokens)
                                rec.update(mode=label, paired_with=name, tokens=L, i=i,
                                           warmup=i < args.warmup, order=pair.index((cl, label)))
                                records.append(rec)
                                line.append(f"{label}={ms(rec['ttft_s'])}ms" if not rec["error"]
                                            else f"{label}=ERR {rec['error'][:80]}")
                            tag = "warmup" if i < args.warmup else f"{i - args.warmup + 1}/{args.n}"
                            log(f"{name} L={L} {tag}: " + "  ".join(line))
            finally:
                dis.stop()
    finally:
        colo.stop()

    # ---- summary -------------------------------------------------------------------------------
    meas = [r for r in records if not r["warmup"] and not r["error"]]
    errors = [r for r in records if r["error"]]
    summary = []
    for name, *_ in modes:
        for L in args.lengths:
            c = [r for r in meas if r["paired_with"] == name and r["tokens"] == L and r["mode"] == "colocated"]
            d = [r for r in meas if r["paired_with"] == name and r["tokens"] == L and r["mode"] == name]
            by_i = {r["i"]: r for r in c}
            diffs = [r["ttft_s"] - by_i[r["i"]]["ttft_s"] for r in d if r["i"] in by_i]
            ratios = [r["ttft_s"] / by_i[r["i"]]["ttft_s"] for r in d if r["i"] in by_i]

            def phase(rs: list[dict], k: str) -> float | None:
                return med([(r["timings"] or {}).get(k) for r in rs])

            row = {
                "mode": name, "tokens": L, "n": len(d), "kv_bytes": kv_per_tok * L,
                "colocated_ttft_median_s": med([r["ttft_s"] for r in c]),
                "colocated_ttft_p90_s": p90([r["ttft_s"] for r in c]),
                "disagg_ttft_median_s": med([r["ttft_s"] for r in d]),
                "disagg_ttft_p90_s": p90([r["ttft_s"] for r in d]),
                "added_ttft_median_s": med(diffs),  # median of paired differences
                "ratio_median": med(ratios),        # median of paired ratios
                "ratio_of_medians": (med([r["ttft_s"] for r in d]) / med([r["ttft_s"] for r in c])
                                     if c and d else None),
                "colocated_phases_median_s": {k: phase(c, k) for k in ("router_queue", "queue", "prefill", "decode")},
                "disagg_phases_median_s": {k: phase(d, k) for k in
                                           ("router_queue", "prefill_queue", "prefill", "transfer", "decode")},
            }
            tr = row["disagg_phases_median_s"]["transfer"]
            row["transfer_effective_gbps"] = (kv_per_tok * L / tr / 1e9) if tr else None
            summary.append(row)

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    out = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_end": load},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python bench/disagg_ttft.py " + " ".join(sys.argv[1:]),
        "model": MODEL, "kv_bytes_per_token": kv_per_tok, "max_tokens": args.max_tokens,
        "n": args.n, "warmup": args.warmup, "lengths": args.lengths, "seed": args.seed,
        "wall_s": time.perf_counter() - t_run,
        "method": ("one request at a time; colocated and one disaggregated cluster up together, requests "
                   "alternate between them with the same prompt, order flipped each round; ttft_s = first SSE "
                   "data chunk carrying a choice; added/ratio = median over paired requests"),
        "clusters": clusters_meta,
        "summary": summary,
        "errors": len(errors),
        "requests": records,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")

    hdr = (f"{'mode':<18} {'tok':>5} {'KV MB':>6} {'colo med':>9} {'colo p90':>9} {'dis med':>8} {'dis p90':>8} "
           f"{'+ms':>7} {'ratio':>6} {'pq ms':>6} {'pf ms':>6} {'xfer ms':>7} {'xfer GB/s':>9}")
    print()
    print(hdr)
    print("-" * len(hdr))
    for r in summary:
        ph = r["disagg_phases_median_s"]
        g = r["transfer_effective_gbps"]
        print(f"{r['mode']:<18} {r['tokens']:>5} {r['kv_bytes'] / 1e6:>6.1f} {ms(r['colocated_ttft_median_s']):>9} "
              f"{ms(r['colocated_ttft_p90_s']):>9} {ms(r['disagg_ttft_median_s']):>8} {ms(r['disagg_ttft_p90_s']):>8} "
              f"{ms(r['added_ttft_median_s']):>7} "
              f"{(r['ratio_median'] or float('nan')):>6.2f} {ms(ph['prefill_queue']):>6} {ms(ph['prefill']):>6} "
              f"{ms(ph['transfer']):>7} {(g or float('nan')):>9.2f}")
    print(f"\n(TTFT in ms; +ms / ratio: median of paired diffs / ratios vs the colocated requests interleaved "
          f"with that mode; pq = prefill_queue, pf = prefill, xfer = decode-side KV wait after the first token; "
          f"errors={len(errors)}; wrote {args.out})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
