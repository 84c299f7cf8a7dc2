"""One short check on a rented GPU (H100 / H200): correctness on cuda, decode and prefill vs the limits.

Run once, from the repo root, with the machine's own python (torch with CUDA); no install needed:

    python3 bench/gpu_check.py                 # ~3-5 minutes on an H100/H200
    python3 bench/gpu_check.py --pd-cmd "..."  # also time a 1P1D run (another engineer's command)

Dry run here, without a GPU:  .venv/bin/python bench/gpu_check.py --device cpu --model demo --dry-run

Parts, each time-boxed; a part that fails is recorded with its error and the script goes on:
  a. tests/test_engine_vs_hf.py with PDSERVE_TEST_DEVICE=<device> (greedy equality with transformers)
  b. decode step time of a llama-3.1-8b-shaped dummy model (bf16) at batch 1, 8, 32, 64, context ~512,
     against weight bytes (+KV bytes) / measured device-to-device copy bandwidth, and / datasheet HBM
  c. prefill tokens/s and MFU for 2048 tokens: one 2048-token prompt, and 4 x 512 in one step
  d. optional: `--pd-cmd` run through the shell (a 1P1D benchmark), its exit code and output tail
  e. bench/engine_bench.py on the demo model (pdserve vs transformers generate on this device)
Everything goes to bench/results/gpu_<device-name-slug>.json, rewritten after each part.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="llama-3.1-8b", help="catalog shape for parts b and c (dummy weights)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--copy-mb", type=int, default=4096)
    ap.add_argument("--kv-gb", type=float, default=8.0, help="KV cache size for parts b and c")
    ap.add_argument("--pd-cmd", default=None, help="shell command of a 1P1D run (part d); skipped if absent")
    ap.add_argument("--pd-timeout", type=float, default=150)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip, e.g. a,e")
    ap.add_argument("--dry-run", action="store_true", help="small settings, for a CPU check of the script")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.dry_run:
        args.batches, args.context, args.decode_steps = "1,4", 64, 4
        args.prefill_tokens, args.copy_mb, args.kv_gb = 256, 256, 0.25
    skip = set(filter(None, args.skip.split(",")))
    dev = args.device
    cuda = dev.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device (use --device cpu --model demo --dry-run to test the script)")
    name = torch.cuda.get_device_name(torch.device(dev)) if cuda else eb.cpu_model()
    out = Path(args.out or ROOT / "bench" / "results" / f"gpu_{slug(name)}.json")
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
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    eb.log(f"device {name}; writing {out}")
    save()

    # a. the engine-vs-transformers tests on this device
    def part_a() -> dict[str, Any]:
        env = {**os.environ, "PDSERVE_TEST_DEVICE": dev, "PYTHONPATH": str(ROOT)}
        return run_cmd([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "tests/test_engine_vs_hf.py"], timeout=200, env=env)

    if "a" not in skip:
        run_part(result, "a_tests_vs_hf", 210, part_a, save)
        eb.log(f"  tests: rc={result['a_tests_vs_hf'].get('rc')}")

    # Reference rates of this device: copy bandwidth and a big matmul.
    def part_ref() -> dict[str, Any]:
        r: dict[str, Any] = {"copy": eb.copy_bandwidth(dev, args.copy_mb * 2**20)}
        r["matmul"] = matmul_tflops(dev, 8192 if cuda else 1024, torch.bfloat16 if cuda else torch.float32)
        return r

    run_part(result, "reference", 60, part_ref, save)
    ref = result["reference"]
    bw = ref["copy"]["gbps_read_plus_write"] if ref.get("ok") else None
    if bw:
        eb.log(f"  copy {bw:.0f} GB/s (read + write), matmul {ref['matmul']['flops_per_s'] / 1e12:.1f} TFLOP/s")

    # b + c need the big model; load it once.
    llm_box: dict[str, LLM] = {}

    def part_load() -> dict[str, Any]:
        import pdserve.model.loader as loader

        if cuda:
            loader._dummy_weights = fast_dummy_weights  # draw on the GPU (see fast_dummy_weights)
        t = time.perf_counter()
        batches = [int(b) for b in args.batches.split(",")]
        llm = LLM(args.model, dtype=args.dtype, device=dev, enable_prefix_caching=False,
                  kv_cache_memory_gb=args.kv_gb, max_num_seqs=max(batches),
                  max_num_batched_tokens=max(args.prefill_tokens, 512))
        llm_box["llm"] = llm
        s = llm.runner.shape
        r = {"model": args.model, "dtype": s.dtype, "params": s.num_params(), "weight_bytes": s.weight_bytes(),
             "kv_bytes_per_token": s.kv_bytes_per_token(), "kv_blocks": llm.runner.num_blocks,
             "load_s": time.perf_counter() - t}
        # Warm up: one short prefill + decode (kernels, allocator).
        eb.run_steps(llm, eb.mixed_prompts(2, 64, 128, s.vocab_size, 99), 4)
        if cuda:
            r["gpu_mem_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        return r

    run_part(result, "model", 180, part_load, save)

    def part_b() -> dict[str, Any]:
        llm = llm_box["llm"]
        rows = []
        for b in [int(x) for x in args.batches.split(",")]:
            d = eb.decode_profile(llm, b, args.context, args.decode_steps, bw, seed=100 + b)
            if sheet["hbm_bytes_per_s"]:
                d["bound_s_datasheet"] = d["weight_bytes"] / sheet["hbm_bytes_per_s"]
                d["bound_datasheet_over_achieved"] = d["bound_s_datasheet"] / d["step_s_median"]
            rows.append(d)
            eb.log(f"  batch {b}: {d['step_s_median'] * 1e3:.2f} ms/step ({d['tokens_per_s']:.0f} tok/s), "
                   f"bound {d['bound_s_weights'] * 1e3:.2f} ms -> {d['bound_over_achieved']:.0%}")
        return {"copy_gbps_read_plus_write": bw, "rows": rows}

    if "b" not in skip and "llm" in llm_box and bw:
        run_part(result, "b_decode", 150, part_b, save)

    def part_c() -> dict[str, Any]:
        llm = llm_box["llm"]
        n = args.prefill_tokens
        peak = sheet["peak_bf16_flops"]
        r = {"peak_bf16_flops": peak,
             "matmul_flops_per_s": ref["matmul"]["flops_per_s"] if ref.get("ok") else None}
        eb.prefill_profile(llm, [n // 4] * 4, seed=5)  # warm up
        for key, lengths in (("one_prompt", [n]), ("four_prompts", [n // 4] * 4)):
            p = eb.prefill_profile(llm, lengths, seed=len(lengths), peak_flops=peak)
            r[key] = p
            mfu = f", MFU {p['mfu_2n']:.1%}" if peak else ""
            eb.log(f"  {key}: {p['tokens_per_s']:.0f} tok/s in {p['steps']} step(s), "
                   f"{p['flops_2n_per_s'] / 1e12:.1f} TFLOP/s{mfu}")
        return r

    if "c" not in skip and "llm" in llm_box:
        run_part(result, "c_prefill", 90, part_c, save)

    llm_box.clear()
    if cuda:
        torch.cuda.empty_cache()

    if args.pd_cmd and "d" not in skip:
        run_part(result, "d_pd", args.pd_timeout + 15, lambda: run_cmd(args.pd_cmd, args.pd_timeout), save)
    else:
        result["d_pd"] = {"skipped": "no --pd-cmd given" if not args.pd_cmd else "--skip d"}

    def part_e() -> dict[str, Any]:
        eo = out.with_name(f"engine_{slug(name)}.json")
        cmd = [sys.executable, "bench/engine_bench.py", "--device", dev, "--model", "demo", "--out", str(eo)]
        if args.dry_run:
            cmd += ["--num-prompts", "4", "--max-len", "64", "--max-tokens", "8", "--repeats", "1",
                    "--decode-steps", "4", "--copy-mb", "64"]
        r = run_cmd(cmd, timeout=150)
        if eo.is_file():
            e = json.loads(eo.read_text())
            r["summary"] = {"throughput": e.get("throughput"), "agreement": e.get("agreement"),
                            "decode": [{k: d[k] for k in ("batch", "step_s_median", "bound_over_achieved")}
                                       for d in e.get("decode", [])]}
        return r

    if "e" not in skip:
        run_part(result, "e_engine_vs_transformers_demo", 170, part_e, save)
    save()
    summary(result)
    eb.log(f"wrote {out} ({result['elapsed_s']:.0f}s)")


def summary(r: dict[str, Any]) -> None:
    print(f"\n== {r['device_name']} (torch {r['machine']['torch']}, cuda {r['cuda_runtime']}) ==")
    a = r.get("a_tests_vs_hf")
    if a:
        print(f"a. tests/test_engine_vs_hf.py: {'PASS' if a.get('passed') else 'FAIL'} (rc {a.get('rc')})"
              + ("" if a.get("passed") else "  " + (a.get("tail") or a.get("error", ""))[-300:]))
    ref = r.get("reference", {})
    if ref.get("ok"):
        print(f"   copy {ref['copy']['gbps_read_plus_write']:.0f} GB/s (read+write); datasheet "
              f"{(r['datasheet']['hbm_bytes_per_s'] or 0) / 1e9:.0f} GB/s; matmul "
              f"{ref['matmul']['flops_per_s'] / 1e12:.1f} TFLOP/s")
    b = r.get("b_decode", {})
    for d in b.get("rows", []):
        print(f"b. decode batch {d['batch']:>3} ctx {d['context']}: {d['step_s_median'] * 1e3:7.2f} ms/step, "
              f"{d['tokens_per_s']:8.0f} tok/s; bound(copy) {d['bound_s_weights'] * 1e3:.2f} ms = "
              f"{d['bound_over_achieved']:.0%} (with KV {d['bound_kv_over_achieved']:.0%})")
    if b and not b.get("ok", True):
        print(f"b. FAILED: {b.get('error')}")
    c = r.get("c_prefill", {})
    for key in ("one_prompt", "four_prompts"):
        if key in c:
            p = c[key]
            mfu = f", MFU {p['mfu_2n']:.1%}" if p.get("mfu_2n") is not None else ""
            print(f"c. prefill {key}: {p['tokens_per_s']:.0f} tok/s, {p['flops_2n_per_s'] / 1e12:.2f} TFLOP/s{mfu}")
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
