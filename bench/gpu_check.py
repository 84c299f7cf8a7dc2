"""One short check on a lent GPU (H100 / H200): correctness on cuda, decode and prefill vs the limits.

Run once, from the repo root, with the machine's own python (torch with CUDA); no install needed:

    python3 bench/gpu_check.py                 # ~2-4 minutes on an H200; every part is time-boxed (< 8 min)
    python3 bench/gpu_check.py --pd-cmd "..."  # also time a 1P1D run (another engineer's command)

Dry run here, without a GPU (tiny settings, < 2 minutes):  .venv/bin/python bench/gpu_check.py --dry-run

Parts; a part that fails is recorded with its error and the script goes on:
  a. tests on the device: tests/test_engine_vs_hf.py with PDSERVE_TEST_DEVICE=<device> (greedy equality
     with transformers; decode goes through the CUDA graphs) and the GPU path's unit tests
  g. the GPU path itself: the Triton paged decode kernel against the torch reference (llama-3.1-8b
     shapes, shuffled blocks, bf16 and fp32) and its time against the KV bytes / measured bandwidth;
     greedy tokens with CUDA graphs == with `enforce_eager`; the KV cache sized from
     gpu_memory_utilization (blocks, weights, activation peak)
  b. decode step time of a llama-3.1-8b-shaped dummy model (bf16) at batch 1, 8, 32, 64, context ~512,
     replayed as CUDA graphs and eagerly, against weight bytes (+KV bytes) / measured copy bandwidth
     (and / datasheet HBM)
  c. prefill tokens/s and MFU for one 2048-token and one 8192-token prompt, and 4 x 512 in one step,
     against the measured bf16 matmul FLOP/s and the datasheet peak
  d. optional: `--pd-cmd` run through the shell (a 1P1D benchmark), its exit code and output tail
  e. bench/engine_bench.py on the demo model (pdserve vs transformers generate on this device)
Everything goes to gpu_<device-name-slug>.json under $OUT (when set) and bench/results/ (a dry run:
$OUT or a temporary folder only), rewritten after each part.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import engine_bench as eb  # noqa: E402

from pdserve import LLM  # noqa: E402

BUDGET_S = 450  # parts that would start after this many seconds are skipped: the whole run stays < 8 min

# Datasheet figures: dense bf16 tensor FLOP/s (no sparsity) and HBM bandwidth, bytes/s.
DATASHEET = [  # (substring of torch.cuda.get_device_name, name, peak bf16 FLOP/s, HBM B/s)
    ("H200", "H200 SXM", 989e12, 4.8e12),
    ("H100 NVL", "H100 NVL", 835e12, 3.9e12),
    ("H100 PCIe", "H100 PCIe", 756e12, 2.0e12),
    ("H100", "H100 SXM", 989e12, 3.35e12),
    ("A100", "A100 SXM", 312e12, 2.0e12),
]


def datasheet(name: str) -> dict[str, Any]:
    for key, label, flops, bw in DATASHEET:
        if key in name:
            return {"matched": label, "peak_bf16_flops": flops, "hbm_bytes_per_s": bw}
    return {"matched": None, "peak_bf16_flops": None, "hbm_bytes_per_s": None}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


@contextlib.contextmanager
def time_box(seconds: float):  # type: ignore[no-untyped-def]
    """Raise TimeoutError in this (main) thread after `seconds` (between Python bytecodes)."""

    def _raise(signum, frame):  # type: ignore[no-untyped-def]
        raise TimeoutError(f"part took longer than {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def fast_dummy_weights(net, seed: int) -> None:  # type: ignore[no-untyped-def]
    """pdserve's dummy init (N(0, 0.02), norms 1, biases 0) drawn on the model's device: the loader
    draws on the CPU, which takes minutes for 8B parameters. Timings don't depend on the values."""
    gen = None
    with torch.no_grad():
        for name, p in net.named_parameters():
            if gen is None:
                gen = torch.Generator(device=p.device).manual_seed(seed)
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)


def run_part(result: dict[str, Any], name: str, seconds: float, fn, save) -> None:  # type: ignore[no-untyped-def]
    eb.log(f"part {name} (time box {seconds:.0f}s)")
    t = time.perf_counter()
    try:
        with time_box(seconds):
            result[name] = {"ok": True, **fn()}
    except BaseException as e:  # noqa: BLE001 - one part failing must not end the run
        if isinstance(e, KeyboardInterrupt):
            raise
        result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc()[-3000:]}
        eb.log(f"  part {name} FAILED: {type(e).__name__}: {e}")
    result[name]["part_s"] = time.perf_counter() - t
    save()


def run_cmd(cmd: list[str] | str, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, shell=isinstance(cmd, str), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    return {"cmd": cmd if isinstance(cmd, str) else " ".join(cmd), "rc": rc, "passed": rc == 0,
            "seconds": time.perf_counter() - t, "tail": out[-4000:]}


def matmul_tflops(device: str, n: int, dtype: torch.dtype, reps: int = 10) -> dict[str, Any]:
    """Achievable dense matmul rate on random data: a practical ceiling beside the datasheet."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    eb.sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    eb.sync(device)
    s = (time.perf_counter() - t) / reps
    return {"n": n, "dtype": str(dtype), "s_per_matmul": s, "flops_per_s": 2 * n**3 / s}


def kernel_check(device: str, dry: bool) -> dict[str, Any]:
    """The Triton paged decode kernel vs the torch reference on this device: error and time."""
    from pdserve.config.model import resolve_shape
    from pdserve.model.paged_attention_triton import paged_decode_torch, paged_decode_triton

    s = resolve_shape("demo" if dry else "llama-3.1-8b")
    bs, rows = 16, []
    cases = [(1, 64), (4, 64)] if dry else [(1, 512), (8, 2048), (32, 2048), (64, 512), (1, 8192)]
    dtypes = [torch.float32] if dry else [torch.bfloat16, torch.float32]
    for dt in dtypes:
        for batch, ctx in cases:
            width = -(-ctx // bs) + 1
            g = torch.Generator(device=device).manual_seed(batch * 7 + ctx)
            nb = batch * width + 1
            cache = torch.randn(2, nb, bs, s.num_kv_heads, s.head_dim, device=device, generator=g).to(dt)
            tables = torch.randperm(nb, device=device, generator=g)[: batch * width].view(batch, width).int()
            lens = torch.randint(max(1, ctx // 2), ctx + 1, (batch,), device=device, generator=g).int()
            q = torch.randn(batch, s.num_heads, s.head_dim, device=device, generator=g).to(dt)
            scale = s.head_dim**-0.5
            ref = paged_decode_torch(q, cache, tables, lens, scale)
            row: dict[str, Any] = {"dtype": str(dt), "batch": batch, "context_max": ctx,
                                   "kv_bytes_read": int(lens.sum()) * s.num_kv_heads * s.head_dim * 2 * cache.element_size()}
            if device.startswith("cuda"):
                out = paged_decode_triton(q, cache, tables, lens, scale)
                row["max_abs_err"] = float((out.float() - ref.float()).abs().max())
                for name, fn in (("triton", paged_decode_triton), ("torch", paged_decode_torch)):
                    fn(q, cache, tables, lens, scale)
                    eb.sync(device)
                    t = time.perf_counter()
                    for _ in range(10):
                        fn(q, cache, tables, lens, scale)
                    eb.sync(device)
                    row[f"{name}_s"] = (time.perf_counter() - t) / 10
            rows.append(row)
            del cache
    return {"rows": rows}


def graphs_vs_eager(device: str, dry: bool, llm: LLM | None = None) -> dict[str, Any]:
    """Greedy tokens of the demo model replayed as CUDA graphs, then eagerly (the same engine with its
    graphs detached): equal? On CPU there are no graphs; the eager run alone checks the part.
    `llm`: an already loaded demo engine to use (the dry run's, to save a load)."""
    from pdserve.engine.sampler import SamplingParams

    t = time.perf_counter()
    if llm is None:
        llm = LLM("demo", device=device, kv_cache_memory_gb=0.25, enable_prefix_caching=False)
    graphs = llm.runner.graphs
    r: dict[str, Any] = {"load_and_capture_s": time.perf_counter() - t,
                         "graph_buckets": graphs.buckets if graphs else None}
    prompts = eb.mixed_prompts(2 if dry else 24, 8, 64, llm.runner.shape.vocab_size, 7)
    params = SamplingParams(temperature=0, max_tokens=4 if dry else 48, ignore_eos=True)
    outs = {}
    for mode in ("graphs", "eager") if graphs else ("eager",):
        llm.runner.graphs = graphs if mode == "graphs" else None
        t = time.perf_counter()
        outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        eb.sync(device)
        r[f"generate_s_{mode}"] = time.perf_counter() - t
    llm.runner.graphs = graphs
    r["sequences"] = len(prompts)
    if graphs:
        r["sequences_equal"] = sum(a == b for a, b in zip(outs["graphs"], outs["eager"], strict=True))
        r["all_equal"] = outs["graphs"] == outs["eager"]
    return r


def kv_sizing_check(device: str) -> dict[str, Any]:
    """The KV cache of an auto-sized worker: gpu_memory_utilization 0.5 on the demo model."""
    if not device.startswith("cuda"):
        return {"skipped": "cpu: the KV cache size is the settings' (kv_cache_memory_gb, num_blocks)"}
    gc.collect()
    torch.cuda.empty_cache()
    t = time.perf_counter()
    llm = LLM("demo", device=device, gpu_memory_utilization=0.5)
    s = llm.runner.shape
    free, total = torch.cuda.mem_get_info(torch.device(device))
    kv = llm.runner.num_blocks * llm.runner.block_size * s.kv_bytes_per_token()
    r = {"num_blocks": llm.runner.num_blocks, "block_size": llm.runner.block_size, "kv_bytes": kv,
         "load_s": time.perf_counter() - t, "total_bytes": total, "free_bytes_after": free,
         "allocated_bytes": torch.cuda.memory_allocated(), "kv_over_total": kv / total}
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="llama-3.1-8b", help="catalog shape for parts b and c (dummy weights)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--prefill-tokens", default="2048,8192", help="one prompt of each length (part c)")
    ap.add_argument("--copy-mb", type=int, default=4096)
    ap.add_argument("--kv-gb", type=float, default=8.0, help="KV cache size for parts b and c")
    ap.add_argument("--pd-cmd", default=None, help="shell command of a 1P1D run (part d); skipped if absent")
    ap.add_argument("--pd-timeout", type=float, default=150)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip, e.g. a,e")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny settings on cpu (demo model), to check the script without a GPU")
    ap.add_argument("--out", default=None, help="the JSON file (default: gpu_<device>.json, see above)")
    args = ap.parse_args()
    if args.dry_run:
        if args.device == "cuda" and not torch.cuda.is_available():
            args.device = "cpu"
        if args.device == "cpu":
            args.model, args.dtype = "demo", "float32"
        args.batches, args.context, args.decode_steps = "1,2", 32, 3
        args.prefill_tokens, args.copy_mb, args.kv_gb = "128,256", 128, 0.25
    skip = set(filter(None, args.skip.split(",")))
    dev = args.device
    cuda = dev.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device (use --dry-run to test the script on cpu)")
    name = torch.cuda.get_device_name(torch.device(dev)) if cuda else eb.cpu_model()
    fname = f"gpu_{slug(name)}.json"
    if args.out:
        outs = [Path(args.out)]
    else:
        env_out = [Path(os.environ["OUT"]) / fname] if os.environ.get("OUT") else []
        if args.dry_run:  # a dry run's numbers are no result: never into bench/results/
            outs = env_out or [Path(tempfile.gettempdir()) / "pdserve-gpu-check" / fname]
        else:
            outs = [*env_out, ROOT / "bench" / "results" / fname]
    out = outs[-1]
    sheet = datasheet(name) if cuda else {"matched": None, "peak_bf16_flops": None, "hbm_bytes_per_s": None}
    result: dict[str, Any] = {
        "command": " ".join(["python3", *sys.argv]),
        "device_name": name,
        "machine": eb.machine_info(dev),
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "datasheet": sheet,
        "args": vars(args),
    }
    if cuda:
        with contextlib.suppress(Exception):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            result["nvidia_smi"] = smi.stdout.strip()
    t0 = time.perf_counter()

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - t0
        result["loadavg_1_5_15_end"] = list(os.getloadavg())
        for o in outs:
            o.parent.mkdir(parents=True, exist_ok=True)
            o.write_text(json.dumps(result, indent=1) + "\n")

    def part(key: str, seconds: float, fn) -> None:  # type: ignore[no-untyped-def]
        left = BUDGET_S - (time.perf_counter() - t0)
        if left < 10:
            result[key] = {"skipped": f"out of time ({BUDGET_S}s budget)"}
            save()
            return
        run_part(result, key, min(seconds, left), fn, save)

    eb.log(f"device {name}; writing {', '.join(map(str, outs))}")
    save()

    # a. the engine-vs-transformers tests on this device, and the GPU path's unit tests
    def part_a() -> dict[str, Any]:
        env = {**os.environ, "PDSERVE_TEST_DEVICE": dev, "PYTHONPATH": str(ROOT)}
        tests = ["tests/test_engine_vs_hf.py", "tests/test_cuda_graph.py", "tests/test_kv_sizing.py",
                 "tests/test_kv_bridge.py", "tests/test_paged_attention_triton.py"]
        if args.dry_run:
            tests = ["tests/test_cuda_graph.py::test_buckets", "tests/test_kv_sizing.py"]
        return run_cmd([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                       timeout=170, env=env)

    if "a" not in skip:
        part("a_tests", 180, part_a)
        eb.log(f"  tests: rc={result['a_tests'].get('rc')}")

    # g. the GPU path: kernel, graphs vs eager, KV sizing
    if "g" not in skip:
        part("g_kernel", 40, lambda: kernel_check(dev, args.dry_run))
        if args.model != "demo":  # else after part "model", on its engine
            part("g_graphs_vs_eager", 60, lambda: graphs_vs_eager(dev, args.dry_run))
        part("g_kv_sizing", 30, lambda: kv_sizing_check(dev))

    # Reference rates of this device: copy bandwidth and a big matmul.
    def part_ref() -> dict[str, Any]:
        r: dict[str, Any] = {"copy": eb.copy_bandwidth(dev, args.copy_mb * 2**20)}
        r["matmul"] = matmul_tflops(dev, 8192 if cuda else 512, torch.bfloat16 if cuda else torch.float32)
        return r

    part("reference", 60, part_ref)
    ref = result["reference"]
    bw = ref["copy"]["gbps_read_plus_write"] if ref.get("ok") else None
    if bw:
        eb.log(f"  copy {bw:.0f} GB/s (read + write), matmul {ref['matmul']['flops_per_s'] / 1e12:.1f} TFLOP/s")

    # b + c need the big model; load it once.
    llm_box: dict[str, LLM] = {}
    prefill_lengths = [int(x) for x in args.prefill_tokens.split(",")]

    def part_load() -> dict[str, Any]:
        import pdserve.model.loader as loader

        if cuda:
            loader._dummy_weights = fast_dummy_weights  # draw on the GPU (see fast_dummy_weights)
        t = time.perf_counter()
        batches = [int(b) for b in args.batches.split(",")]
        llm = LLM(args.model, dtype=args.dtype, device=dev, enable_prefix_caching=False,
                  kv_cache_memory_gb=args.kv_gb, max_num_seqs=max(batches),
                  max_num_batched_tokens=max(*prefill_lengths, 512))
        llm_box["llm"] = llm
        s = llm.runner.shape
        r = {"model": args.model, "dtype": s.dtype, "params": s.num_params(), "weight_bytes": s.weight_bytes(),
             "kv_bytes_per_token": s.kv_bytes_per_token(), "kv_blocks": llm.runner.num_blocks,
             "graph_buckets": llm.runner.graphs.buckets if llm.runner.graphs else None,
             "load_s": time.perf_counter() - t}
        # Warm up: one short prefill + decode (kernels, allocator).
        eb.run_steps(llm, eb.mixed_prompts(2, 64, 128, s.vocab_size, 99), 4)
        if cuda:
            r["gpu_mem_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        return r

    part("model", 180, part_load)
    if "g" not in skip and args.model == "demo" and "llm" in llm_box:
        part("g_graphs_vs_eager", 60, lambda: graphs_vs_eager(dev, args.dry_run, llm_box["llm"]))
    if "g_graphs_vs_eager" in result:
        eb.log(f"  graphs == eager: {result['g_graphs_vs_eager'].get('all_equal')}")

    def part_b() -> dict[str, Any]:
        llm = llm_box["llm"]
        graphs = llm.runner.graphs
        rows = []
        for b in [int(x) for x in args.batches.split(",")]:
            for mode in ("graphs", "eager") if graphs else ("eager",):
                llm.runner.graphs = graphs if mode == "graphs" else None
                d = eb.decode_profile(llm, b, args.context, args.decode_steps, bw, seed=100 + b)
                d["mode"] = mode
                if sheet["hbm_bytes_per_s"]:
                    d["bound_s_datasheet"] = d["weight_bytes"] / sheet["hbm_bytes_per_s"]
                    d["bound_datasheet_over_achieved"] = d["bound_s_datasheet"] / d["step_s_median"]
                rows.append(d)
                eb.log(f"  batch {b} {mode}: {d['step_s_median'] * 1e3:.2f} ms/step ({d['tokens_per_s']:.0f} tok/s), "
                       f"bound {d['bound_s_weights'] * 1e3:.2f} ms -> {d['bound_over_achieved']:.0%}")
        llm.runner.graphs = graphs
        by = {(d["batch"], d["mode"]): d["step_s_median"] for d in rows}
        first, last = min(int(x) for x in args.batches.split(",")), max(int(x) for x in args.batches.split(","))
        mode = "graphs" if graphs else "eager"
        return {"copy_gbps_read_plus_write": bw, "rows": rows,
                "largest_over_batch1": by[(last, mode)] / by[(first, mode)]}

    if "b" not in skip and "llm" in llm_box and bw:
        part("b_decode", 150, part_b)

    def part_c() -> dict[str, Any]:
        llm = llm_box["llm"]
        peak = sheet["peak_bf16_flops"]
        measured = ref["matmul"]["flops_per_s"] if ref.get("ok") else None
        r: dict[str, Any] = {"peak_bf16_flops": peak, "matmul_flops_per_s": measured}
        n = prefill_lengths[0]
        eb.prefill_profile(llm, [n // 4] * 4, seed=5)  # warm up
        runs = [(f"one_prompt_{m}", [m]) for m in prefill_lengths] + [("four_prompts", [n // 4] * 4)]
        for key, lengths in runs:
            p = eb.prefill_profile(llm, lengths, seed=len(lengths), peak_flops=peak)
            if measured:
                p["over_measured_matmul_2n"] = p["flops_2n_per_s"] / measured
            r[key] = p
            mfu = f", MFU {p['mfu_2n']:.1%}" if peak else ""
            eb.log(f"  {key}: {p['tokens_per_s']:.0f} tok/s in {p['steps']} step(s), "
                   f"{p['flops_2n_per_s'] / 1e12:.1f} TFLOP/s{mfu}")
        return r

    if "c" not in skip and "llm" in llm_box:
        part("c_prefill", 90, part_c)

    llm_box.clear()
    if cuda:
        torch.cuda.empty_cache()

    if args.pd_cmd and "d" not in skip:
        part("d_pd", args.pd_timeout + 15, lambda: run_cmd(args.pd_cmd, args.pd_timeout))
    else:
        result["d_pd"] = {"skipped": "no --pd-cmd given" if not args.pd_cmd else "--skip d"}

    def part_e() -> dict[str, Any]:
        eo = out.with_name(f"engine_{slug(name)}.json")
        cmd = [sys.executable, "bench/engine_bench.py", "--device", dev, "--model", "demo", "--out", str(eo)]
        if args.dry_run:
            cmd += ["--num-prompts", "2", "--max-len", "32", "--max-tokens", "4", "--repeats", "1",
                    "--decode-steps", "2", "--decode-ctx", "32", "--copy-mb", "64", "--max-num-batched-tokens", "64"]
        eo.unlink(missing_ok=True)  # a file left by an earlier run must not pass for this one's
        r = run_cmd(cmd, timeout=150)
        if eo.is_file():
            e = json.loads(eo.read_text())
            r["summary"] = {"throughput": e.get("throughput"), "agreement": e.get("agreement"),
                            "decode": [{k: d.get(k) for k in ("batch", "step_s_median", "bound_over_achieved")}
                                       for d in e.get("decode", [])]}
        return r

    if "e" not in skip:
        part("e_engine_vs_transformers_demo", 160, part_e)
    save()
    summary(result)
    eb.log(f"wrote {', '.join(map(str, outs))} ({result['elapsed_s']:.0f}s)")


def summary(r: dict[str, Any]) -> None:
    print(f"\n== {r['device_name']} (torch {r['machine']['torch']}, cuda {r['cuda_runtime']}) ==")
    a = r.get("a_tests")
    if a:
        print(f"a. tests on the device: {'PASS' if a.get('passed') else 'FAIL'} (rc {a.get('rc')})"
              + ("" if a.get("passed") else "  " + (a.get("tail") or a.get("error", ""))[-300:]))
    for row in r.get("g_kernel", {}).get("rows", []):
        t = f", triton {row['triton_s'] * 1e6:.0f} us, torch {row['torch_s'] * 1e6:.0f} us" if "triton_s" in row else ""
        print(f"g. kernel {row['dtype']} batch {row['batch']} ctx<={row['context_max']}: "
              f"err {row.get('max_abs_err', '-')}{t}")
    ge = r.get("g_graphs_vs_eager", {})
    if ge:
        got = (f"{ge.get('sequences_equal')}/{ge.get('sequences')} equal" if ge.get("graph_buckets")
               else "no graphs on this device (eager run only)")
        print(f"g. greedy tokens, graphs vs eager: {got}"
              + ("" if ge.get("ok", True) else f"  FAILED: {ge.get('error')}"))
    ks = r.get("g_kv_sizing", {})
    if ks.get("kv_over_total") is not None:
        print(f"g. KV sized from gpu_memory_utilization 0.5: {ks['num_blocks']} blocks, "
              f"{ks['kv_over_total']:.0%} of the device")
    ref = r.get("reference", {})
    if ref.get("ok"):
        print(f"   copy {ref['copy']['gbps_read_plus_write']:.0f} GB/s (read+write); datasheet "
              f"{(r['datasheet']['hbm_bytes_per_s'] or 0) / 1e9:.0f} GB/s; matmul "
              f"{ref['matmul']['flops_per_s'] / 1e12:.1f} TFLOP/s")
    b = r.get("b_decode", {})
    for d in b.get("rows", []):
        print(f"b. decode batch {d['batch']:>3} {d['mode']:>6} ctx {d['context']}: {d['step_s_median'] * 1e3:7.2f} "
              f"ms/step, {d['tokens_per_s']:8.0f} tok/s; bound(copy) {d['bound_s_weights'] * 1e3:.2f} ms = "
              f"{d['bound_over_achieved']:.0%} (with KV {d['bound_kv_over_achieved']:.0%})")
    if b.get("largest_over_batch1"):
        print(f"b. largest batch / batch 1 step time: {b['largest_over_batch1']:.2f}x")
    if b and not b.get("ok", True):
        print(f"b. FAILED: {b.get('error')}")
    c = r.get("c_prefill", {})
    for key, p in c.items():
        if isinstance(p, dict) and "tokens_per_s" in p:
            mfu = f", MFU {p['mfu_2n']:.1%}" if p.get("mfu_2n") is not None else ""
            rel = f", {p['over_measured_matmul_2n']:.0%} of matmul" if p.get("over_measured_matmul_2n") else ""
            print(f"c. prefill {key}: {p['tokens_per_s']:.0f} tok/s, {p['flops_2n_per_s'] / 1e12:.2f} TFLOP/s{mfu}{rel}")
    if c and not c.get("ok", True):
        print(f"c. FAILED: {c.get('error')}")
    d = r.get("d_pd", {})
    print(f"d. 1P1D: {d.get('skipped') or ('rc ' + str(d.get('rc')))}")
    e = r.get("e_engine_vs_transformers_demo")
    if e:
        t = (e.get("summary") or {}).get("throughput") or {}
        print(f"e. demo engine vs transformers: rc {e.get('rc')}, speedup {t.get('speedup_best')}, "
              f"agreement {((e.get('summary') or {}).get('agreement') or {}).get('sequences_equal')}")


if __name__ == "__main__":
    main()
