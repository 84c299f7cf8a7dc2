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
import shutil
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
from pdserve.model.tokenizer import DEMO_TOKENIZER_DIR  # noqa: E402

# This tree's pdserve, run by the interpreter running the bench (a venv's entry point may be elsewhere).
PDSERVE = [sys.executable, "-m", "pdserve.cli"]
MODES = {
    "tcp": (["--transport", "tcp"], None, "defaults: tcp, prefill.max_wait_ms 0"),
    "tcp_wait50": (["--transport", "tcp"], "prefill:\n  max_wait_ms: 50\n", "tcp, prefill.max_wait_ms 50"),
    "shm": (["--transport", "shm"], None, "shm transport, otherwise defaults"),
    "tcp_chunk512": (["--transport", "tcp"], "prefill:\n  chunk_tokens: 512\n", "tcp, prefill.chunk_tokens 512"),
}
# Every cluster: an 8k prompt on a loaded machine may take minutes; a retry (first-token timeout) or
# an expired decode reservation (30 s by default) would spoil the pair. Neither changes an idle TTFT.
BASE_YAML = "router:\n  first_token_timeout_s: 600\ndecode:\n  reservation_timeout_s: 600\n"
PHASES = ("router_queue", "router_reserve", "queue", "prefill", "hops", "engine_cpu_s", "transfer", "decode")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(folder: Path, context: int) -> None:
    """The demo shape with `context` positions, random weights, as a Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = CATALOG["demo"]
    cfg = LlamaConfig(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                      num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                      num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim, vocab_size=s.vocab_size,
                      max_position_embeddings=context, rope_theta=s.rope_theta, rms_norm_eps=s.rms_norm_eps,
                      tie_word_embeddings=s.tie_word_embeddings, bos_token_id=s.bos_token_id,
                      eos_token_id=s.eos_token_ids[0], torch_dtype="float32")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    for f in DEMO_TOKENIZER_DIR.iterdir():
        shutil.copy(f, folder / f.name)


class Cluster:
    def __init__(self, name: str, model: str, args: list[str], yaml_text: str | None = None) -> None:
        self.name = name
        self.port = free_port()
        yaml_text = BASE_YAML + (yaml_text or "")
        self.cfg_path = None
        if yaml_text:
            fd, self.cfg_path = tempfile.mkstemp(suffix=".yaml", prefix=f"pdserve-{name}-")
            os.write(fd, yaml_text.encode())
            os.close(fd)
            args = ["--config", self.cfg_path, *args]
        self.model = model
        self.cmd = [*PDSERVE, "up", "--model", model, *args, "--port", str(self.port), "--threads", "1"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    def display_cmd(self) -> str:
        cmd = " ".join(self.cmd[3:]).replace(str(self.port), "PORT").replace(self.model, "MODEL")
        if self.cfg_path:
            cmd = cmd.replace(self.cfg_path, "CFG.yaml")
        return "pdserve " + cmd

    def start(self, timeout: float = 300.0) -> None:
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

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the cluster's worker processes (not the router's), from /proc."""
        if self.proc is None:
            return 0.0
        tck = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in _children(self.proc.pid):
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{pid}/cmdline").read_text()
            except OSError:
                continue
            if "serve" in cmd.split("\0"):  # a worker (`pdserve serve --role ...`)
                total += (int(f[11]) + int(f[12])) / tck
        return total

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


def _children(pid: int) -> list[int]:
    """`pid` and its descendants."""
    parent: dict[int, int] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                parent[int(p)] = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += [c for c, pp in parent.items() if pp == q]
    return out


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


def phases(rec: dict) -> dict[str, float | None]:
    """One request's TTFT broken down (see the module docstring); colocated `queue` and prefill
    `prefill_queue` both count as `queue`."""
    t = rec["timings"] or {}
    out: dict[str, float | None] = {k: t.get(k) for k in ("router_queue", "router_reserve", "prefill",
                                                          "transfer", "decode")}
    out["queue"] = t.get("queue", t.get("prefill_queue"))
    parts = [out["router_queue"], out["queue"], out["prefill"]]
    out["hops"] = rec["ttft_s"] - sum(parts) if None not in parts and rec["ttft_s"] is not None else None
    out["engine_cpu_s"] = rec.get("engine_cpu_s")
    return out


def med(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def summarize(records: list[dict], modes: list[str], lengths: list[int]) -> list[dict]:
    meas = [r for r in records if not r["warmup"] and not r["error"]]
    rows = []
    for name in modes:
        for L in lengths:
            c = [r for r in meas if r["paired_with"] == name and r["tokens"] == L and r["mode"] == "colocated"]
            d = [r for r in meas if r["paired_with"] == name and r["tokens"] == L and r["mode"] == name]
            by_i = {r["i"]: r for r in c}
            pairs = [(by_i[r["i"]], r) for r in d if r["i"] in by_i]
            rows.append({
                "mode": name, "tokens": L, "n": len(pairs),
                "colocated_ttft_median_s": med([r["ttft_s"] for r in c]),
                "disagg_ttft_median_s": med([r["ttft_s"] for r in d]),
                "added_ttft_median_s": med([b["ttft_s"] - a["ttft_s"] for a, b in pairs]),
                "ratio_median": med([b["ttft_s"] / a["ttft_s"] for a, b in pairs]),
                "cpu_ratio_median": med([b["engine_cpu_s"] / a["engine_cpu_s"] for a, b in pairs
                                         if a.get("engine_cpu_s") and b.get("engine_cpu_s")]),
                "same_tokens": all(a["token_ids"] == b["token_ids"] for a, b in pairs),
                "colocated_phases_median_s": {k: med([phases(r)[k] for r in c]) for k in PHASES},
                "disagg_phases_median_s": {k: med([phases(r)[k] for r in d]) for k in PHASES},
            })
    return rows


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stack = [("router_queue", "router (incl. reserve)"), ("queue", "worker queue"), ("prefill", "prefill compute"),
             ("hops", "hops (HTTP, frames, SSE)")]
    fig, axes = plt.subplots(1, len(summary), figsize=(3.2 * len(summary), 4), squeeze=False)
    for ax, row in zip(axes[0], summary, strict=True):
        for x, side in enumerate(("colocated", "disagg")):
            ph = row[f"{side}_phases_median_s"]
            bottom = 0.0
            for i, (k, label) in enumerate(stack):
                v = max(0.0, ph.get(k) or 0.0)
                ax.bar(x, v, bottom=bottom, color=f"C{i}", label=label if x == 0 else None)
                bottom += v
            ax.text(x, bottom, f"{row[f'{side}_ttft_median_s']:.2f}s", ha="center", va="bottom", fontsize=8)
        ax.set_xticks([0, 1], ["colocated", row["mode"]])
        ax.set_title(f"{row['tokens']} tokens: {row['ratio_median']:.2f}x", fontsize=9)
        ax.set_ylabel("median TTFT (s)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(stack))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


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

    hdr = (f"{'mode':<13} {'tok':>5} {'colo ms':>8} {'dis ms':>8} {'+ms':>7} {'ratio':>6} {'cpu x':>6} "
           f"{'reserve':>7} {'rq c/d':>11} {'q c/d':>9} {'pf c/d':>15} {'hops c/d':>11}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in summary:
        c, d = r["colocated_phases_median_s"], r["disagg_phases_median_s"]
        print(f"{r['mode']:<13} {r['tokens']:>5} {ms(r['colocated_ttft_median_s']):>8} {ms(r['disagg_ttft_median_s']):>8} "
              f"{ms(r['added_ttft_median_s']):>7} {(r['ratio_median'] or float('nan')):>6.2f} "
              f"{(r['cpu_ratio_median'] or float('nan')):>6.2f} {ms(d['router_reserve']):>7} "
              f"{ms(c['router_queue']) + '/' + ms(d['router_queue']):>11} {ms(c['queue']) + '/' + ms(d['queue']):>9} "
              f"{ms(c['prefill']) + '/' + ms(d['prefill']):>15} {ms(c['hops']) + '/' + ms(d['hops']):>11}"
              + ("" if r["same_tokens"] else "  TOKENS DIFFER"))
    print(f"\n(medians, ms; +ms / ratio / cpu x: median of paired diffs / ratios vs the colocated requests "
          f"interleaved with that mode; errors={len(errors)}; wall {out['wall_s']:.0f}s; wrote {path})")
    return 1 if errors or not all(r["same_tokens"] for r in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
