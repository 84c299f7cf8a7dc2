"""TTFT that disaggregation adds over colocated serving, on an idle system, side by side in one run.

    python bench/disagg_ttft.py [--n 4] [--warmup 1] [--lengths 512 2048 8192] [--modes tcp]
                                [--label quiet] [--out bench/results/disagg_ttft.json]

Real `pdserve up` processes on a demo-shaped model (the `demo` catalog shape, random weights, with
a context long enough for 8k prompts: written to a temporary Hugging Face folder): a colocated
cluster (1 colocated worker) stays up for the whole run; each disaggregated cluster (1 prefill +
1 decode worker) is started beside it in turn, so at most two clusters exist at once. Modes:

  tcp          the defaults (tcp transport, prefill.max_wait_ms 0)
  tcp_wait50   prefill.max_wait_ms 50 (YAML --config): the batcher waits for a fuller batch
  shm          the shm transport
  tcp_chunk512 prefill.chunk_tokens 512: the prefill role chunks prompts as colocated does

Requests go one at a time (idle system), alternating between the colocated cluster and the
disaggregated one with the same random prompt (token ids, fresh per request: no prefix cache
hits); the order within each pair flips every round. TTFT is the time from sending the request to
the first SSE chunk that carries a token (`return_token_ids`, so a token that decodes to no text
still counts). Per-phase breakdown, per side, from each request's server `timings`:

  router_queue    router: request in -> work sent to a worker (disagg: includes router_reserve,
                  the Reserve round trip to the decode worker)
  queue           worker: arrival -> first scheduled (colocated `queue`, prefill `prefill_queue`)
  prefill         worker: first scheduled -> first token sampled (the compute)
  hops            TTFT - the above: HTTP in, tokenization, frames worker -> router, SSE out
  engine_cpu_s    CPU seconds the workers' threads used during the request (from /proc; robust to
                  other jobs on the cores, unlike wall time)
and, off the TTFT path, `transfer` (decode side: KV wait after the first token was sent) and
`decode`. Each mode is compared with the colocated requests interleaved with it: median of the
paired differences and ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

# Beside this file: the clusters it starts, and what it makes of their answers.
from ttft_cluster import BASE_YAML, CATALOG, ROOT, Cluster, log, make_model
from ttft_report import ms, phases, plot, print_table, summarize

MODES = {
    "tcp": (["--transport", "tcp"], None, "defaults: tcp, prefill.max_wait_ms 0"),
    "tcp_wait50": (["--transport", "tcp"], "prefill:\n  max_wait_ms: 50\n", "tcp, prefill.max_wait_ms 50"),
    "shm": (["--transport", "shm"], None, "shm transport, otherwise defaults"),
    "tcp_chunk512": (["--transport", "tcp"], "prefill:\n  chunk_tokens: 512\n", "tcp, prefill.chunk_tokens 512"),
}


def one_request(client: httpx.Client, cl: Cluster, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": cl.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.0, "return_token_ids": True}
    rec: dict = {"ttft_s": None, "e2e_s": None, "chunks": 0, "timings": None, "error": None, "token_ids": []}
    cpu0 = cl.cpu_seconds()
    start = time.perf_counter()
    try:
        with client.stream("POST", cl.url + "/v1/completions", json=body) as resp:
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
                for c in ev.get("choices") or []:
                    if c.get("token_ids"):
                        rec["chunks"] += 1
                        rec["token_ids"] += c["token_ids"]
                        if rec["ttft_s"] is None:
                            rec["ttft_s"] = now
                if "timings" in ev:
                    t = ev["timings"]
                    t = t[0] if isinstance(t, list) else t
                    rec["timings"] = {k: float(v) for k, v in t.items()}
                rec["e2e_s"] = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    rec["engine_cpu_s"] = cl.cpu_seconds() - cpu0
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4, help="measured request pairs per mode and length")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--modes", nargs="+", default=["tcp"], choices=sorted(MODES))
    ap.add_argument("--label", default="quiet", help="what the machine was doing (quiet, loaded): goes in the JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/disagg_ttft.json"))
    args = ap.parse_args()

    t_run = time.perf_counter()
    load_start = os.getloadavg()
    rng = np.random.default_rng(args.seed)
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pdserve-ttft-model-") as tmp:
        model = Path(tmp) / "demo-long"
        make_model(model, max(args.lengths) + args.max_tokens + 64)
        colo = Cluster("colocated", str(model), ["--colocated", "1", "--prefill", "0", "--decode", "0"])
        clusters_meta = {"colocated": {"command": colo.display_cmd(), "what": "1 colocated worker",
                                       "config_yaml": BASE_YAML}}
        try:
            colo.start()
            for name in args.modes:
                flags, yaml_text, what = MODES[name]
                dis = Cluster(name, str(model), ["--prefill", "1", "--decode", "1", *flags], yaml_text)
                clusters_meta[name] = {"command": dis.display_cmd(), "what": "1 prefill + 1 decode worker, " + what,
                                       "config_yaml": BASE_YAML + (yaml_text or "")}
                dis.start()
                try:
                    with httpx.Client(timeout=httpx.Timeout(600.0)) as client:
                        for L in args.lengths:
                            for i in range(args.warmup + args.n):
                                prompt = rng.integers(3, 3900, size=L).tolist()
                                pair = [(colo, "colocated"), (dis, name)]
                                if i % 2:
                                    pair.reverse()
                                line = []
                                for k, (cl, label) in enumerate(pair):
                                    rec = one_request(client, cl, prompt, args.max_tokens)
                                    rec.update(mode=label, paired_with=name, tokens=L, i=i,
                                               warmup=i < args.warmup, order=k, phases=None)
                                    if not rec["error"]:
                                        rec["phases"] = phases(rec)
                                    records.append(rec)
                                    line.append(f"{label}={ms(rec['ttft_s'])}ms" if not rec["error"]
                                                else f"{label}=ERR {rec['error'][:80]}")
                                tag = "warmup" if i < args.warmup else f"{i - args.warmup + 1}/{args.n}"
                                log(f"{name} L={L} {tag}: " + "  ".join(line))
                finally:
                    dis.stop()
        finally:
            colo.stop()

    summary = summarize(records, args.modes, args.lengths)
    errors = [r for r in records if r["error"]]
    out = {
        "label": args.label,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python bench/disagg_ttft.py " + " ".join(sys.argv[1:]),
        "model": "demo shape (catalog `demo`), random weights, context " + str(max(args.lengths) + args.max_tokens + 64),
        "kv_bytes_per_token": CATALOG["demo"].kv_bytes_per_token(), "max_tokens": args.max_tokens,
        "n": args.n, "warmup": args.warmup, "lengths": args.lengths, "seed": args.seed,
        "wall_s": time.perf_counter() - t_run,
        "method": ("one request at a time; colocated and one disaggregated cluster up together, requests alternate "
                   "with the same prompt, order flipped each round; ttft_s = first SSE chunk carrying a token; "
                   "added/ratio = median over pairs; peer: the colocated worker on the same cores"),
        "phases": {"router_queue": "router: request in -> work sent (disagg: includes router_reserve)",
                   "router_reserve": "disagg: the Reserve round trip to the decode worker",
                   "queue": "worker: arrival -> first scheduled", "prefill": "worker: scheduled -> first token",
                   "hops": "TTFT - router_queue - queue - prefill: HTTP, tokenization, frames, SSE",
                   "engine_cpu_s": "CPU seconds of the cluster's worker processes during the request",
                   "transfer": "off the TTFT path: decode-side KV wait after the first token",
                   "decode": "off the TTFT path"},
        "clusters": clusters_meta,
        "summary": summary,
        "errors": len(errors),
        "requests": records,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    plot(summary, path.with_suffix(".png"),
         f"{args.label}: median TTFT by phase, load {load_start[0]:.1f}-{out['machine']['loadavg_at_end'][0]:.1f}")

    print_table(summary, len(errors), out["wall_s"], path)
    return 1 if errors or not all(r["same_tokens"] for r in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
