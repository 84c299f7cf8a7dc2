"""Engine throughput beside `transformers` generate, and decode/prefill against the hardware limits.

    .venv/bin/python bench/engine_bench.py [--model demo] [--device cpu] [--dtype float32] [--quick]
                                           [--threads 1] [--out bench/results/engine_cpu.json]

Rooflines: the copy bandwidth (bytes read + written per second of one large tensor copy) and the
matmul FLOP/s (best of square fp32 matmuls) are measured in the same run. A decode step's bound is
max(bytes it must read / copy bandwidth, FLOPs / matmul FLOP/s), bytes = weights + the KV of every
sequence's context; a prefill is compared with the matmul FLOP/s. Decode steps and prefills here
are model steps (`ModelRunner.execute` + greedy argmax) on sequences whose KV blocks are allocated
as the engine would (zeros: the values do not change the time), so 2k-context batches need no
prefill first. The 512-context batches of 16 (and the largest) are also run with the blocks past the first 256
tokens of context interleaved across sequences (`layout: fragmented`: those are gathered, not read
in place), and profiled per op (the batch-1 step at the first context too): the top ops, and every
op's self time summed by category (`op_categories`: matmul, attention, KV gather, ...). Each step
also records this thread's CPU time (`step_cpu_s_*`), which leaves out the waits for a core on a
loaded machine. `kernels` (from `engine_kernels.py`) times the batched step's kernels alone: the
decode-attention variants over a fragmented cache and the projections against MKL's prepacked GEMM.
`offline_breakdown` splits one offline run into prefill steps, decode steps and the time outside
steps, at the batch budget and with the whole batch in one step, and gives the ratio to
`transformers` each part's roofline would allow. `--quick` runs a subset in a few minutes.
`--ab linear` (the default) times the engine as configured against the same engine with its
projections by `F.linear` instead of the native small-batch kernel (`cache.decode_linear`),
alternated in the same run: the offline throughput (`pdserve` and `pdserve_torch_linear`) and
every decode model step (`decode_steps` and `decode_steps_torch_linear`, alternated step by step
on one runner). `--ab attention` does the same for the native decode-attention kernel against
gather + SDPA (`..._torch_attention`, round 5's runs). `--ab layer`: the fused decoder layer
(`cache.decode_layer`, one native call per layer) against the per-op path with the same native
kernels (`..._per_op`). `--ab prefill_ops`: the native element-wise ops of the steps that are not
fused (`cache.prefill_ops`) against the torch ops, in the offline runs, their breakdown and the
prefill model steps (alternated step by step); decode steps up to 32 sequences are fused either
way and run once. `--ab prefill_attention`: the native prefill-attention kernel
(`cache.prefill_attention`) against SDPA (`..._torch_prefill_attention`), the same way; `--ab
prefill`: both at once (`..._torch_prefill`: round 7's prefill path).
`--steps-only`: the decode model steps alone (no throughput, breakdown,
kernels or prefill).

One run, side by side, on the same weights (pdserve's dummy weights copied into the matching
`transformers` model, or one checkpoint folder loaded by both) and the same batch of mixed-length
prompts, greedy, `max_tokens` new tokens each with EOS ignored:

* pdserve `LLM.generate` (continuous batching, chunked prefill; prefix caching off so repeats
  don't hit the cache) and `transformers` `generate` on the batch left-padded, alternated
  `--repeats` times; output tokens/s of each and the ratio. The outputs are compared token for
  token; a prompt that differs is re-run through `transformers` alone (no padding) to tell padding
  numerics from an engine bug.
* The memory copy bandwidth of this device (a large tensor copy, bytes read + written per second),
  and pdserve's decode step time at batch 1 and at the batch size against the bound
  (weight bytes [+ KV bytes read]) / copy bandwidth.
* pdserve's prefill tokens/s and achieved FLOP/s (2 x params x tokens; no peak is known for a CPU).

Results (machine, command, raw step times) go to JSON; a table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine_kernels  # noqa: E402  (beside this file)

from pdserve import LLM, SamplingParams  # noqa: E402
from pdserve.config import CATALOG  # noqa: E402
from pdserve.config.model import ModelShape  # noqa: E402
from pdserve.model.loader import hf_state_dict  # noqa: E402

GB = 1e9
_ids = itertools.count()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- machine --------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "loadavg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(cuda=torch.version.cuda, gpu_name=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_sms=p.multi_processor_count)
    return info


def copy_bandwidth(device: str, nbytes: int, reps: int = 5) -> dict[str, float]:
    """Best of `reps` copies of one large tensor; GB/s counting bytes read plus bytes written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in / warm up
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    best = min(times)
    del src, dst
    return {"bytes": nbytes, "best_s": best, "median_s": statistics.median(times),
            "gbps_read_plus_write": 2 * nbytes / best / GB}


# ---- prompts and models ---------------------------------------------------------------------------
def mixed_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    """`n` prompts of random token ids (3..vocab), lengths spread evenly over [lo, hi], shuffled."""
    rng = random.Random(seed)
    lengths = [round(lo + (hi - lo) * i / max(1, n - 1)) for i in range(n)]
    rng.shuffle(lengths)
    return [[rng.randrange(3, vocab) for _ in range(k)] for k in lengths]


def hf_config(shape: ModelShape):  # type: ignore[no-untyped-def]
    """A `transformers` config of the same shape as a catalog model (dummy weights)."""
    import transformers

    cls = getattr(transformers, shape.architecture.replace("ForCausalLM", "Config"))
    kw: dict[str, Any] = dict(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings, rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta, tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=shape.bos_token_id, eos_token_id=list(shape.eos_token_ids), pad_token_id=0,
    )
    if shape.rope_scaling:
        kw["rope_scaling"] = dict(shape.rope_scaling)
    if shape.architecture == "LlamaForCausalLM":
        kw["attention_bias"] = shape.attention_bias
    cfg = cls(**kw)
    cfg.architectures = [shape.architecture]
    return cfg


def hf_model(model: str, llm: LLM, device: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """The `transformers` model with exactly the weights `llm` runs."""
    from transformers import AutoModelForCausalLM

    if model not in CATALOG:
        return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    cfg = hf_config(llm.runner.shape)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    missing, unexpected = hf.load_state_dict(hf_state_dict(llm.runner.model), strict=False)
    missing = [m for m in missing if "rotary_emb" not in m and not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dicts differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf = hf.to(device)
    hf.generation_config.eos_token_id = None  # ignore EOS, as pdserve's ignore_eos does
    hf.generation_config.pad_token_id = 0
    return hf.eval()


@torch.inference_mode()
def hf_generate(hf, prompts: list[list[int]], max_tokens: int, device: str) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """One batched greedy `generate`, prompts left-padded with token 0."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    gen = hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    sync(device)
    return gen[:, width:].tolist()


def ours_generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def agreement(ours: list[list[int]], ref: list[list[int]]) -> dict[str, Any]:
    prefix = []
    for a, b in zip(ours, ref, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(k)
    n_tok = sum(len(r) for r in ref)
    return {
        "sequences_equal": sum(a == b for a, b in zip(ours, ref, strict=True)),
        "sequences": len(ref),
        "first_token_equal": sum(bool(a) and bool(b) and a[0] == b[0] for a, b in zip(ours, ref, strict=True)),
        "common_prefix_tokens": prefix,
        "common_prefix_fraction": sum(prefix) / n_tok if n_tok else 1.0,
    }


# ---- engine step profiles -------------------------------------------------------------------------
def run_steps(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[dict[str, Any]]:
    """Feed `prompts` to the engine core and step it dry; one record per step."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        llm.core.add(llm.core.make_request(f"bench-{next(_ids)}", p, params))
    steps = []
    while llm.scheduler.has_work():
        r = llm.core.step()
        steps.append({"decode_seqs": r.output.num_decode_seqs, "prefill_tokens": r.output.num_prefill_tokens,
                      "duration_s": r.duration})
    return steps


def decode_profile(llm: LLM, batch: int, ctx: int, steps: int, bw_gbps: float, seed: int) -> dict[str, Any]:
    """Median time of the engine steps that decode all `batch` sequences (context ~`ctx`) and nothing
    else, against (weight bytes [+ the KV bytes each step reads]) / copy bandwidth."""
    shape = llm.runner.shape
    prompts = mixed_prompts(batch, ctx, ctx, shape.vocab_size, seed)
    # Chunked prefill overlaps the first sequences' decode with the later ones' prefill: give each
    # sequence enough tokens to still be running `steps` steps after the last prefill chunk.
    budget = llm.scheduler.config.max_num_batched_tokens
    prefill_steps = -(-batch * ctx // max(1, budget - batch)) + 1
    recs = run_steps(llm, prompts, steps + prefill_steps + 1)
    dec = [r["duration_s"] for r in recs if r["prefill_tokens"] == 0 and r["decode_seqs"] == batch]
    if not dec:
        raise RuntimeError(f"no pure decode step at batch {batch} (max_num_seqs too small?)")
    step = statistics.median(dec)
    wbytes = shape.weight_bytes()
    ctx_timed = ctx + prefill_steps / 2 + steps / 2  # about the mean context over the timed steps
    kv_bytes = batch * ctx_timed * shape.kv_bytes_per_token()
    bound = wbytes / (bw_gbps * GB)
    bound_kv = (wbytes + kv_bytes) / (bw_gbps * GB)
    return {
        "batch": batch, "context": ctx, "context_timed_approx": ctx_timed, "steps_timed": len(dec), "step_s_median": step,
        "step_s_min": min(dec), "step_s_all": dec, "tokens_per_s": batch / step,
        "weight_bytes": wbytes, "kv_bytes_read_per_step": kv_bytes,
        "bound_s_weights": bound, "bound_s_weights_kv": bound_kv,
        "bound_over_achieved": bound / step,  # fraction of the bandwidth roofline reached (weights only)
        "bound_kv_over_achieved": bound_kv / step,
        "achieved_over_bound": step / bound,  # how many times slower than the bound
    }


def prefill_profile(llm: LLM, lengths: list[int], seed: int, peak_flops: float | None = None) -> dict[str, Any]:
    """Prefill `lengths` prompts (1 output token each); tokens/s and FLOP/s over the pure prefill steps."""
    shape = llm.runner.shape
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, shape.vocab_size) for _ in range(n)] for n in lengths]
    recs = run_steps(llm, prompts, 1)
    pre = [r for r in recs if r["prefill_tokens"] > 0 and r["decode_seqs"] == 0]
    tokens = sum(r["prefill_tokens"] for r in pre)
    secs = sum(r["duration_s"] for r in pre)
    flops_2n = 2.0 * shape.num_params() * tokens
    # Matmul FLOPs plus causal attention (each token sees on average half its prompt).
    flops_model = sum(shape.flops_per_token(n / 2) * n for n in lengths)
    out = {
        "prompt_lengths": lengths, "steps": len(pre), "step_tokens": [r["prefill_tokens"] for r in pre],
        "step_s": [r["duration_s"] for r in pre], "tokens": tokens, "seconds": secs,
        "tokens_per_s": tokens / secs, "flops_2n_per_s": flops_2n / secs,
        "flops_model_per_s": flops_model / secs,
    }
    if peak_flops:
        out["peak_flops"] = peak_flops
        out["mfu_2n"] = flops_2n / secs / peak_flops
        out["mfu_model"] = flops_model / secs / peak_flops
    return out


# ---- model-step rooflines ----------------------------------------------------------------------------
def matmul_flops(device: str, n: int = 2048, reps: int = 4, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Best of `reps` [n x n] @ [n x n] matmuls, FLOP/s."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t)
    return {"n": n, "dtype": str(dtype), "best_s": min(times), "all_s": times,
            "flops_per_s": 2 * n**3 / min(times)}


def _step_runner(model: str, dtype: str | None, device: str, tokens: int, seed: int,  # type: ignore[no-untyped-def]
                 decode_attention: str = "auto", decode_linear: str = "auto", decode_layer: str = "auto"):
    from pdserve.config.engine import CacheConfig
    from pdserve.engine.model_runner import ModelRunner

    return ModelRunner(model, CacheConfig(block_size=16, num_blocks=tokens // 16 + 64,
                                          decode_attention=decode_attention,  # type: ignore[arg-type]
                                          decode_linear=decode_linear,  # type: ignore[arg-type]
                                          decode_layer=decode_layer),  # type: ignore[arg-type]
                       device=device, dtype=dtype, seed=seed)


def _requests(runner, lengths: list[int], vocab: int, seed: int, prompt: int | None = None):  # type: ignore[no-untyped-def]
    """Requests with block tables laid out as the engine does: each prompt's blocks consecutive
    (admitted together); with `prompt` set, blocks past the first `prompt` tokens are handed out
    one at a time round-robin across the sequences, as decoding grows them (fragmented)."""
    from pdserve.sched import Request

    bs = runner.block_size
    rng = random.Random(seed)
    reqs, nxt = [], 0
    need = [-(-n // bs) for n in lengths]
    first = [need_i if prompt is None else min(need_i, -(-prompt // bs)) for need_i in need]
    for i, n in enumerate(lengths):
        r = Request(f"s{i}", [rng.randrange(3, vocab) for _ in range(n)], max_tokens=1, arrival_time=0.0)
        r.block_ids = list(range(nxt, nxt + first[i]))
        nxt += first[i]
        reqs.append(r)
    while any(len(r.block_ids) < k for r, k in zip(reqs, need, strict=True)):
        for r, k in zip(reqs, need, strict=True):
            if len(r.block_ids) < k:
                r.block_ids.append(nxt)
                nxt += 1
    assert nxt <= runner.num_blocks, "cache too small"
    return reqs


# The path each A/B compares with the engine as configured ("default"): its key in the JSON, and
# how it is switched on a runner (on: the alternative; off: back to the default).
AB_KEYS = {"attention": "torch_attention", "linear": "torch_linear", "layer": "per_op",
           "prefill_ops": "torch_prefill_ops", "prefill_attention": "torch_prefill_attention",
           "prefill": "torch_prefill"}
# The A/Bs that change only the steps that are not fused decode steps (prefill, mixed); "prefill"
# is both of the others at once (the round-7 engine's prefill).
PREFILL_ABS = ("prefill_ops", "prefill_attention", "prefill")


def defaults_of(runner) -> tuple[bool, range, range, Any, bool]:  # type: ignore[no-untyped-def]
    """The runner's own choices, as `set_alternative` restores them."""
    return runner.native_decode, runner.linear_rows, runner.layer_rows, runner.prefill_ops, runner.native_prefill


def set_alternative(runner, ab: str, on: bool, default: tuple[bool, range, range, Any, bool]) -> None:  # type: ignore[no-untyped-def]
    """`ab` "attention": decode attention by gather + SDPA; "linear": projections by F.linear;
    "layer": the per-op path instead of the fused layer (which needs the native projections and
    attention, so it is off under those alternatives); "prefill_ops": the torch element-wise ops
    in the steps that are not fused; "prefill_attention": prefill chunks by SDPA; "prefill": both."""
    runner.native_decode = default[0] and not (on and ab == "attention")
    runner.linear_rows = range(0) if on and ab == "linear" else default[1]
    runner.layer_rows = range(0) if on and ab not in PREFILL_ABS else default[2]
    runner.prefill_ops = None if on and ab in ("prefill_ops", "prefill") else default[3]
    runner.native_prefill = default[4] and not (on and ab in ("prefill_attention", "prefill"))


def model_decode(runner, batch: int, ctx: int, steps: int, bw_gbps: float, flops: float,  # type: ignore[no-untyped-def]
                 seed: int, profile_ops: bool = False, fragmented: bool = False,
                 modes: tuple[str, ...] = ("default",), ab: str = "attention") -> dict[str, dict[str, Any]]:
    """Median model step decoding `batch` sequences at context ~`ctx`, against its roofline.
    Contiguous layout: each sequence's blocks consecutive (read in place); fragmented: the blocks
    past the prompt interleaved across sequences (gathered), as after decoding a while.
    modes: "default" (the runner as configured) and "alt" (`ab`'s alternative path: torch decode
    attention or F.linear projections), alternated step by step on the same runner and cache;
    one record per mode."""
    from pdserve.sched.output import ScheduledChunk, SchedulerOutput

    shape = runner.shape
    reqs = _requests(runner, [ctx + steps + 4] * batch, shape.vocab_size, seed,
                     prompt=ctx - 256 if fragmented else None)
    default = defaults_of(runner)
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}  # this thread's CPU time: without waits for a core

    def step(k: int, mode: str) -> None:
        set_alternative(runner, ab, mode == "alt", default)
        for r in reqs:
            r.num_computed_tokens = ctx + k
        out = SchedulerOutput([ScheduledChunk(r, 1, sample=True) for r in reqs])
        runner.execute(out).argmax(-1).tolist()

    try:
        for m in modes:
            step(0, m)  # warm-up (buffers, kernels)
        for k in range(1, steps + 1):
            for m in modes:
                t, c = time.perf_counter(), time.thread_time()
                step(k, m)
                sync(runner.device.type)
                times[m].append(time.perf_counter() - t)
                cpu[m].append(time.thread_time() - c)
        ctx_mean = ctx + (steps + 1) / 2
        kv_bytes = batch * ctx_mean * shape.kv_bytes_per_token()
        step_flops = batch * shape.flops_per_token(int(ctx_mean))
        bytes_s = (shape.weight_bytes() + kv_bytes) / (bw_gbps * GB)
        flops_s = step_flops / flops
        roof = max(bytes_s, flops_s)
        recs = {}
        for m in modes:
            med = statistics.median(times[m])
            rec: dict[str, Any] = {
                "batch": batch, "context": ctx, "layout": "fragmented" if fragmented else "contiguous",
                "decode_attention": "native" if default[0] and not (m == "alt" and ab == "attention") else "torch",
                "decode_linear": "native" if batch in default[1] and not (m == "alt" and ab == "linear") else "torch",
                "decode_layer": "native" if batch in default[2] and default[0] and m != "alt" else "torch",
                "steps": steps, "step_s_median": med, "step_s_min": min(times[m]),
                "step_s_all": times[m], "step_cpu_s_median": statistics.median(cpu[m]), "step_cpu_s_all": cpu[m],
                "tokens_per_s": batch / med, "weight_bytes": shape.weight_bytes(),
                "kv_bytes_read": kv_bytes, "flops": step_flops, "bound_bytes_s": bytes_s, "bound_flops_s": flops_s,
                "roofline_s": roof, "roofline_over_achieved": roof / med, "achieved_over_roofline": med / roof,
            }
            if profile_ops:
                rec["op_profile"], rec["op_categories"] = op_profile(lambda m=m: step(steps + 1, m), 3)
            recs[m] = rec
    finally:
        set_alternative(runner, ab, False, default)
    return recs


# What each op's self time is spent on, for the per-op breakdown (first match wins).
OP_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("matmul", ("pdserve::native_linear",)),
    ("fused_layer", ("pdserve::decode_layer",)),
    ("attention", ("aten::_scaled_dot_product", "aten::scaled_dot_product", "pdserve::native_decode",
                   "pdserve::native_prefill")),
    ("kv_gather", ("aten::index_select",)),
    ("kv_write", ("aten::index_copy",)),
    ("norm_rope_act", ("aten::mul", "aten::add", "aten::pow", "aten::mean", "aten::rsqrt", "aten::silu",
                       "aten::cat", "aten::neg", "aten::div", "aten::sub", "aten::where", "pdserve::prefill_ops")),
    ("alloc", ("aten::empty",)),
    ("views", ("aten::transpose", "aten::as_strided", "aten::slice", "aten::reshape", "aten::view",
               "aten::select", "aten::split", "aten::chunk", "aten::unsqueeze", "aten::t", "aten::expand")),
]


def op_profile(fn, reps: int, top: int = 14) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # type: ignore[no-untyped-def]
    """torch.profiler's top ops by self CPU time per call of `fn`, and every op's self time summed
    by category (`OP_CATEGORIES`); `unattributed_ms` is the profiled wall time no op accounts for
    (Python, the profiler itself)."""
    from torch.profiler import ProfilerActivity, profile

    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    wall_ms = (time.perf_counter() - t) * 1e3 / reps
    ops = prof.key_averages()
    rows = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]
    cats: dict[str, float] = {name: 0.0 for name, _ in OP_CATEGORIES} | {"other": 0.0}
    for e in ops:
        name = next((c for c, prefixes in OP_CATEGORIES if e.key.startswith(prefixes)), "other")
        cats[name] += e.self_cpu_time_total / 1e3 / reps
    summary = {"ms_per_step": cats, "profiled_wall_ms_per_step": wall_ms,
               "unattributed_ms": wall_ms - sum(cats.values())}
    return ([{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / reps,
              "calls_per_step": e.count / reps} for e in rows], summary)


def offline_breakdown(llm: LLM, prompts: list[list[int]], max_tokens: int, bw_gbps: float,
                      flops: float) -> dict[str, Any]:
    """One `LLM.generate` of the offline batch with every engine step timed: time in steps that
    carry prefill tokens, in pure decode steps, and outside steps (detokenizing, bookkeeping);
    beside it the same steps' rooflines (prefill: FLOPs / matmul FLOP/s; decode: weights + KV at
    the mean context / copy bandwidth)."""
    shape = llm.runner.shape
    recs: list[tuple[int, int, float, float]] = []  # prefill tokens, decode seqs, wall s, thread CPU s
    core_step = llm.core.step

    def timed():  # type: ignore[no-untyped-def]
        c = time.thread_time()
        r = core_step()
        recs.append((r.output.num_prefill_tokens, r.output.num_decode_seqs, r.duration, time.thread_time() - c))
        return r

    llm.core.step = timed  # type: ignore[method-assign]
    try:
        t, c = time.perf_counter(), time.thread_time()
        ours_generate(llm, prompts, max_tokens)
        wall, cpu = time.perf_counter() - t, time.thread_time() - c
    finally:
        del llm.core.step
    pre = [r for r in recs if r[0]]
    dec = [r for r in recs if not r[0]]
    mean_ctx = statistics.mean(len(p) for p in prompts) + max_tokens / 2
    dec_bound = sum((shape.weight_bytes() + n * mean_ctx * shape.kv_bytes_per_token()) / (bw_gbps * GB) for _, n, *_ in dec)
    pre_bound = sum(shape.flops_per_token(len(p) / 2) * len(p) for p in prompts) / flops
    steps_s = sum(r[2] for r in recs)
    return {
        "max_num_batched_tokens": llm.scheduler.config.max_num_batched_tokens, "wall_s": wall, "cpu_s": cpu,
        "prefill_steps_cpu_s": sum(r[3] for r in pre), "decode_steps_cpu_s": sum(r[3] for r in dec),
        "steps": len(recs), "prefill_steps": len(pre), "decode_steps": len(dec),
        "prefill_steps_s": sum(r[2] for r in pre), "decode_steps_s": sum(r[2] for r in dec),
        "outside_steps_s": wall - steps_s, "decode_batch_mean": statistics.mean(r[1] for r in dec) if dec else 0,
        "decode_step_s_median": statistics.median(r[2] for r in dec) if dec else None,
        "prefill_roofline_s": pre_bound, "decode_roofline_s_approx": dec_bound,
        "step_records": recs,
    }


def model_prefill(runner, length: int, flops: float, seed: int, reps: int = 1,  # type: ignore[no-untyped-def]
                  modes: tuple[str, ...] = ("default",), ab: str = "none") -> dict[str, dict[str, Any]]:
    """One fresh prompt of `length` tokens in one model step (first token sampled): tokens/s and
    FLOP/s against the matmul FLOP/s. modes: "default" and "alt" (`ab`'s alternative), alternated
    step by step after one untimed step each (buffers); one record per mode."""
    from pdserve.sched.output import ScheduledChunk, SchedulerOutput

    shape = runner.shape
    default = defaults_of(runner)
    times: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for k in range(-1 if len(modes) > 1 else 0, reps):
            for m in modes:
                set_alternative(runner, ab, m == "alt", default)
                (req,) = _requests(runner, [length], shape.vocab_size, seed + k)
                t = time.perf_counter()
                runner.execute(SchedulerOutput([ScheduledChunk(req, length, sample=True)])).argmax(-1).tolist()
                sync(runner.device.type)
                if k >= 0:
                    times[m].append(time.perf_counter() - t)
    finally:
        set_alternative(runner, ab, False, default)
    head = 2.0 * shape.vocab_size * shape.hidden_size
    # Causal attention: token i sees i + 1 keys, on average about half the prompt; the LM head
    # runs for the sampled row only.
    model_flops = length * (shape.flops_per_token(length // 2) - head) + head
    recs = {}
    for m, ts in times.items():
        best = min(ts)
        recs[m] = {"tokens": length, "s_all": ts, "s_best": best, "s_median": statistics.median(ts),
                   "tokens_per_s": length / best, "flops": model_flops, "flops_per_s": model_flops / best,
                   "matmul_flops_per_s": flops, "fraction_of_matmul": model_flops / best / flops}
    return recs


# ---- main -----------------------------------------------------------------------------------------
def step_cases(runner, args: argparse.Namespace, bw: dict[str, float], mm: dict[str, Any], compare: bool,  # type: ignore[no-untyped-def]
               alt: str, result: dict[str, Any]) -> None:
    """Every decode model-step case (result["decode_steps"], and the --ab alternative's beside it)."""
    batches = [int(x) for x in args.step_batches.split(",")]
    contexts = [int(x) for x in args.step_contexts.split(",")]
    log("decode model steps against max(bytes / copy bandwidth, FLOPs / matmul FLOP/s)")
    # prefill A/Bs: decode steps up to 32 sequences are the same (fused) on both sides, timed once
    modes = ("default", "alt") if compare and args.ab not in PREFILL_ABS else ("default",)
    steps, torch_steps = [], []
    cases = [(ctx, b, False) for ctx in contexts for b in batches]
    cases += [(contexts[0], b, True) for b in sorted({min(16, max(batches)), max(batches)})]
    for ctx, b, frag in cases:
        recs = model_decode(runner, b, ctx, args.step_decode_steps, bw["gbps_read_plus_write"], mm["flops_per_s"],
                            args.seed + b, profile_ops=frag or (b in (1, 16) and ctx == contexts[0]),
                            fragmented=frag, modes=modes, ab=args.ab)
        for m, d in recs.items():
            d["loadavg_1"] = os.getloadavg()[0]
            (steps if m == "default" else torch_steps).append(d)
            log(f"  batch {b:>2} ctx {ctx}{' (fragmented)' if frag else ''} attention {d['decode_attention']:>6} "
                f"linear {d['decode_linear']:>6} layer {d['decode_layer']:>6}: "
                f"{d['step_s_median'] * 1e3:7.2f} ms, roofline {d['roofline_s'] * 1e3:6.2f} ms"
                f" -> {d['roofline_over_achieved']:.0%} of roofline (load {d['loadavg_1']:.1f})")
    result["decode_steps"] = steps
    if torch_steps:  # the same steps on the alternative path, alternated step by step
        result[f"decode_steps_{alt}"] = torch_steps
    if args.ab == "layer" and compare:
        result["fused_breakdown"] = []
        for batch in (1, 16):
            if batch not in runner.layer_rows:
                continue
            b = fused_breakdown(runner, batch, contexts[0], 2 * args.step_decode_steps, bw["gbps_read_plus_write"],
                                mm["flops_per_s"], args.seed)
            result["fused_breakdown"].append(b)
            m = b["median_s"]
            log(f"  batch {batch} ctx {contexts[0]}, fused: step {m['step_s'] * 1e3:.2f} ms = layers "
                f"{m['layers_s'] * 1e3:.2f} ({b['layer_s_median'] * 1e3:.3f} a layer, bound "
                f"{b['layer_bound_s'] * 1e3:.3f}) + lm_head {m['lm_head_s'] * 1e3:.2f} (bound "
                f"{b['lm_head_bound_s'] * 1e3:.2f}) + rest {m['rest_s'] * 1e3:.2f}")
            log("    phases, ms (bound): " + ", ".join(f"{p} {v * 1e3:.2f} ({b['phase_bound_s'][p] * 1e3:.2f})"
                                                       for p, v in b["phases_s_median"].items()))


def fused_breakdown(runner, batch: int, ctx: int, steps: int, bw_gbps: float, flops: float,  # type: ignore[no-untyped-def]
                    seed: int) -> dict[str, Any]:
    """Where a decode step's time goes under the fused layer, by timers around the real step's
    parts (the profiler's own cost is larger than what remains): the layer calls, the lm_head, and
    the rest (packing, metadata, RoPE rows, embedding, argmax, Python); inside the layers, each
    phase's wall time (decode_layer.c's own timers, `FusedDecode.time_phases`) beside its bound:
    max(its weights + KV bytes / copy bandwidth, its FLOPs / matmul FLOP/s)."""
    from pdserve.model.decode_layer import PHASES
    from pdserve.sched.output import ScheduledChunk, SchedulerOutput

    fused, s = runner.fused, runner.shape
    assert fused is not None and batch in runner.layer_rows and runner.native_decode
    reqs = _requests(runner, [ctx + steps + 4] * batch, s.vocab_size, seed)
    acc = {"layers": 0.0, "lm_head": 0.0}
    layer, logits = fused.layer, runner.model.logits

    def timed_layer(i: int, cache: torch.Tensor) -> None:
        t = time.perf_counter()
        layer(i, cache)
        acc["layers"] += time.perf_counter() - t

    def timed_logits(hidden: torch.Tensor, native: bool = False) -> torch.Tensor:
        t = time.perf_counter()
        out = logits(hidden, native)
        acc["lm_head"] += time.perf_counter() - t
        return out

    parts: dict[str, list[float]] = {"step_s": [], "layers_s": [], "lm_head_s": [], "rest_s": []}
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    fused.layer, runner.model.logits = timed_layer, timed_logits
    try:
        for k in range(steps + 1):
            acc["layers"] = acc["lm_head"] = 0.0
            fused.time_phases(True)
            for r in reqs:
                r.num_computed_tokens = ctx + k
            t = time.perf_counter()
            runner.execute(SchedulerOutput([ScheduledChunk(r, 1, sample=True) for r in reqs])).argmax(-1).tolist()
            total = time.perf_counter() - t
            if k:  # the first is a warm-up
                parts["step_s"].append(total)
                parts["layers_s"].append(acc["layers"])
                parts["lm_head_s"].append(acc["lm_head"])
                parts["rest_s"].append(total - acc["layers"] - acc["lm_head"])
                for p, v in fused.phase_seconds().items():
                    phases[p].append(v)
    finally:
        fused.time_phases(False)
        del fused.layer, runner.model.logits  # the instance attributes: back to the methods
    h, nq, nkv, i_ = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.intermediate_size
    kv_read = batch * (ctx + steps / 2) * s.kv_bytes_per_token()  # all layers
    # per step, all layers: (bytes, FLOPs) of each phase
    cost = {"norm_qkv_rope_kv_write": (4 * h * (nq + 2 * nkv) * s.num_layers, 2 * batch * h * (nq + 2 * nkv) * s.num_layers),
            "attention": (kv_read, 4 * batch * (ctx + steps / 2) * nq * s.num_layers),
            "o_proj": (4 * nq * h * s.num_layers, 2 * batch * nq * h * s.num_layers),
            "residual_norm_gate_up_silu": (8 * i_ * h * s.num_layers, 4 * batch * i_ * h * s.num_layers),
            "down": (4 * i_ * h * s.num_layers, 2 * batch * i_ * h * s.num_layers),
            "residual": (0, 0)}
    med = {k: statistics.median(v) for k, v in parts.items()}
    return {"batch": batch, "context": ctx, "steps": steps, "median_s": med, "all_s": parts,
            "phases_s_median": {p: statistics.median(v) for p, v in phases.items()},
            "phase_bound_s": {p: max(b / (bw_gbps * GB), f / flops) for p, (b, f) in cost.items()},
            "phase_bytes_flops": cost, "layer_s_median": med["layers_s"] / s.num_layers,
            "layer_bound_s": (sum(b for b, _ in cost.values())) / s.num_layers / (bw_gbps * GB),
            "lm_head_bound_s": 4 * h * s.vocab_size / (bw_gbps * GB)}


def compares(runner, ab: str) -> bool:  # type: ignore[no-untyped-def]
    """Whether the runner as configured runs the path `ab` switches off (else nothing to compare)."""
    return ((ab == "attention" and runner.native_decode) or (ab == "linear" and len(runner.linear_rows) > 0)
            or (ab == "layer" and runner.native_decode and len(runner.layer_rows) > 0)
            or (ab == "prefill_ops" and runner.prefill_ops is not None)
            or (ab == "prefill_attention" and runner.native_prefill)
            or (ab == "prefill" and (runner.prefill_ops is not None or runner.native_prefill)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help="catalog name (dummy weights) or HF checkpoint folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the model's)")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="alternating timed runs of each engine")
    ap.add_argument("--decode-ctx", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--copy-mb", type=int, default=512, help="size of the bandwidth-test tensor")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--skip-hf", action="store_true", help="pdserve numbers only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a subset (about a minute): smoke test of the script")
    ap.add_argument("--step-batches", default="1,8,16,32", help="decode model-step batch sizes")
    ap.add_argument("--step-contexts", default="512,2048", help="decode model-step contexts")
    ap.add_argument("--step-decode-steps", type=int, default=8)
    ap.add_argument("--prefill-lengths", default="512,2048,8192", help="fresh prompt lengths (one step each)")
    ap.add_argument("--decode-attention", default="auto", choices=["auto", "native", "torch"],
                    help="cache.decode_attention of pdserve")
    ap.add_argument("--decode-linear", default="auto", choices=["auto", "native", "torch"],
                    help="cache.decode_linear of pdserve")
    ap.add_argument("--decode-layer", default="auto", choices=["auto", "native", "torch"],
                    help="cache.decode_layer of pdserve")
    ap.add_argument("--ab", default="linear",
                    choices=["linear", "attention", "layer", "prefill_ops", "prefill_attention", "prefill", "none"],
                    help="alternated in each measurement (throughput, model steps) with the engine as "
                         "configured: linear: projections by F.linear; attention: decode attention by "
                         "gather + SDPA (round 5's A/B); layer: the per-op path, not the fused layer; "
                         "prefill_ops: the torch element-wise ops in steps not fused; prefill_attention: "
                         "prefill chunks by SDPA, not the native kernel; prefill: both; none")
    ap.add_argument("--steps-only", action="store_true", help="the decode model steps only")
    ap.add_argument("--out", default=None, help="default bench/results/engine_<device>.json")
    args = ap.parse_args()
    if args.quick:
        args.num_prompts, args.max_tokens, args.repeats = 8, 16, 1
        args.step_batches, args.step_contexts, args.step_decode_steps = "1,16", "512", 4
        args.prefill_lengths, args.copy_mb = "512,2048", 256

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    dev = args.device
    out_path = Path(args.out or Path(__file__).parent / "results" / f"engine_{dev.split(':')[0]}.json")
    result: dict[str, Any] = {
        "command": " ".join(["PYTHONPATH=. .venv/bin/python", *sys.argv]),
        "note": "a shared machine: see machine.loadavg_1_5_15, loadavg_at_end and each step's loadavg_1",
        "machine": machine_info(dev),
        "args": vars(args),
    }
    t_all = time.perf_counter()

    log(f"copy bandwidth on {dev} ({args.copy_mb} MB tensor)")
    bw = copy_bandwidth(dev, args.copy_mb * 2**20)
    result["copy_bandwidth"] = bw
    log(f"  {bw['gbps_read_plus_write']:.1f} GB/s (read + write)")
    mm = matmul_flops(dev)
    result["matmul"] = mm
    log(f"  matmul {mm['flops_per_s'] / 1e9:.1f} GFLOP/s ({mm['n']}^3 {mm['dtype']})")

    log(f"loading pdserve model {args.model} on {dev}")
    attn, lin, lay = args.decode_attention, args.decode_linear, args.decode_layer
    if args.steps_only:  # the decode model steps alone, the --ab alternative alternated with them
        batches = [int(x) for x in args.step_batches.split(",")]
        most = max(batches) * (max(int(x) for x in args.step_contexts.split(",")) + args.step_decode_steps + 8)
        runner = _step_runner(args.model, args.dtype, dev, most, args.seed, attn, lin, lay)
        compare, alt = compares(runner, args.ab), AB_KEYS.get(args.ab, "")
        s = runner.shape
        result["ab"] = {"compared": args.ab if compare else "none", "key": alt}
        result["model"] = {"name": args.model, "dtype": s.dtype, "params": s.num_params(),
                           "weight_bytes": s.weight_bytes(), "kv_bytes_per_token": s.kv_bytes_per_token()}
        step_cases(runner, args, bw, mm, compare, alt, result)
        result["total_s"] = time.perf_counter() - t_all
        result["loadavg_at_end"] = list(os.getloadavg())
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {out_path}")
        return
    llm = LLM(args.model, dtype=args.dtype, device=dev, enable_prefix_caching=False,
              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=max(64, args.num_prompts),
              seed=args.seed, decode_attention=attn, decode_linear=lin, decode_layer=lay)
    shape = llm.runner.shape
    # The engine as configured ("pdserve"), and the --ab alternative beside it, alternated (where
    # the engine runs the native path at all).
    defaults = defaults_of(llm.runner)
    compare = compares(llm.runner, args.ab)
    alt = AB_KEYS.get(args.ab, "")
    result["decode_attention"] = {"setting": attn, "engine_native": llm.runner.native_decode,
                                  "torch_path_alongside": compare and args.ab == "attention"}
    result["decode_linear"] = {"setting": lin, "native_rows": [defaults[1].start, defaults[1].stop - 1]
                               if len(defaults[1]) else [], "torch_path_alongside": compare and args.ab == "linear"}
    result["ab"] = {"compared": args.ab if compare else "none", "key": alt}
    result["model"] = {"name": args.model, "dtype": shape.dtype, "params": shape.num_params(),
                       "weight_bytes": shape.weight_bytes(), "kv_bytes_per_token": shape.kv_bytes_per_token()}
    prompts = mixed_prompts(args.num_prompts, args.min_len, args.max_len, shape.vocab_size, args.seed)
    lens = [len(p) for p in prompts]
    n_out = args.num_prompts * args.max_tokens
    result["prompts"] = {"lengths": lens, "max_tokens": args.max_tokens, "total_prompt_tokens": sum(lens)}
    log(f"{len(prompts)} prompts, lengths {min(lens)}..{max(lens)} ({sum(lens)} tokens), {args.max_tokens} new each")

    hf = None
    if not args.skip_hf:
        log("building the transformers model with the same weights")
        hf = hf_model(args.model, llm, dev, llm.runner.dtype)

    # Warm up both (allocator, kernels, thread pools) on a small batch.
    warm = mixed_prompts(2, 8, 32, shape.vocab_size, args.seed + 1)
    ours_generate(llm, warm, 4)
    if hf is not None:
        hf_generate(hf, warm, 4, dev)

    times: dict[str, list[float]] = {"pdserve": [], "transformers": []}
    if compare:
        times[f"pdserve_{alt}"] = []
    # This thread's CPU time of each run (with --threads 1 every kernel runs on it): on a loaded
    # machine, the run without the waits for a core.
    cpu_times: dict[str, list[float]] = {k: [] for k in times}
    ours_out = ref_out = torch_attn_out = None
    for rep in range(args.repeats):
        t, c = time.perf_counter(), time.thread_time()
        ours_out = ours_generate(llm, prompts, args.max_tokens)
        sync(dev)
        times["pdserve"].append(time.perf_counter() - t)
        cpu_times["pdserve"].append(time.thread_time() - c)
        log(f"  run {rep + 1}/{args.repeats}: pdserve {times['pdserve'][-1]:.2f}s "
            f"({n_out / times['pdserve'][-1]:.0f} tok/s)")
        if compare:
            set_alternative(llm.runner, args.ab, True, defaults)
            t, c = time.perf_counter(), time.thread_time()
            torch_attn_out = ours_generate(llm, prompts, args.max_tokens)
            times[f"pdserve_{alt}"].append(time.perf_counter() - t)
            cpu_times[f"pdserve_{alt}"].append(time.thread_time() - c)
            set_alternative(llm.runner, args.ab, False, defaults)
            log(f"  run {rep + 1}/{args.repeats}: pdserve, {alt.replace('_', ' ')} "
                f"{times[f'pdserve_{alt}'][-1]:.2f}s ({n_out / times[f'pdserve_{alt}'][-1]:.0f} tok/s)")
        if hf is not None:
            t, c = time.perf_counter(), time.thread_time()
            ref_out = hf_generate(hf, prompts, args.max_tokens, dev)
            times["transformers"].append(time.perf_counter() - t)
            cpu_times["transformers"].append(time.thread_time() - c)
            log(f"  run {rep + 1}/{args.repeats}: transformers {times['transformers'][-1]:.2f}s "
                f"({n_out / times['transformers'][-1]:.0f} tok/s)")
    thr: dict[str, Any] = {"output_tokens": n_out, "seconds": times, "cpu_seconds": cpu_times}
    for k, v in times.items():
        if v:
            thr[f"{k}_tok_per_s_best"] = n_out / min(v)
            thr[f"{k}_tok_per_s_median"] = n_out / statistics.median(v)
    if times["transformers"]:
        thr["speedup_best"] = min(times["transformers"]) / min(times["pdserve"])
        thr["speedup_median"] = statistics.median(times["transformers"]) / statistics.median(times["pdserve"])
        if compare:
            thr[f"speedup_median_{alt}"] = (statistics.median(times["transformers"])
                                            / statistics.median(times[f"pdserve_{alt}"]))
        thr["speedup_cpu_median"] = (statistics.median(cpu_times["transformers"])
                                     / statistics.median(cpu_times["pdserve"]))
        if compare:
            thr[f"speedup_cpu_median_{alt}"] = (statistics.median(cpu_times["transformers"])
                                                / statistics.median(cpu_times[f"pdserve_{alt}"]))
    if compare:  # > 1: the native kernel is faster
        thr[f"{alt}_over_native_median"] = (statistics.median(times[f"pdserve_{alt}"])
                                            / statistics.median(times["pdserve"]))
        thr[f"{alt}_over_native_cpu_median"] = (statistics.median(cpu_times[f"pdserve_{alt}"])
                                                / statistics.median(cpu_times["pdserve"]))
    result["throughput"] = thr

    # Where the offline time goes, at the batch budget above and with the whole batch's prompts
    # in one step (no chunking), alternated; and the ratio each part's roofline would allow.
    log("offline breakdown: prefill steps, decode steps, outside steps")
    whole = LLM(args.model, dtype=args.dtype, device=dev, enable_prefix_caching=False,
                max_num_batched_tokens=sum(lens) + args.num_prompts, max_num_seqs=max(64, args.num_prompts),
                seed=args.seed, decode_attention=attn, decode_linear=lin, decode_layer=lay)
    ours_generate(whole, warm, 4)
    variants = [("budget", llm, True), ("whole_batch", whole, True)]
    if compare:  # the budget run again on the alternative path
        variants.append((f"budget_{alt}", llm, False))
    rounds: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in variants}
    for _ in range(2):
        for key, engine, native in variants:
            default = defaults_of(engine.runner)
            set_alternative(engine.runner, args.ab, not native, default)
            try:
                rounds[key].append(offline_breakdown(engine, prompts, args.max_tokens, bw["gbps_read_plus_write"],
                                                     mm["flops_per_s"]))
            finally:
                set_alternative(engine.runner, args.ab, False, default)
            b = rounds[key][-1]
            log(f"  {key} ({b['max_num_batched_tokens']} tokens/step): wall {b['wall_s']:.2f}s = prefill steps "
                f"{b['prefill_steps_s']:.2f}s ({b['prefill_steps']}) + decode steps {b['decode_steps_s']:.2f}s "
                f"({b['decode_steps']}, mean batch {b['decode_batch_mean']:.1f}) + outside {b['outside_steps_s']:.2f}s")
    del whole
    bd: dict[str, Any] = {"runs": rounds}
    if times["transformers"]:
        hf_s = statistics.median(times["transformers"])
        b0 = rounds["budget"]
        med = {k: statistics.median(r[k] for r in b0) for k in
               ("wall_s", "prefill_steps_s", "decode_steps_s", "outside_steps_s", "prefill_roofline_s",
                "decode_roofline_s_approx")}
        bd["budget_median"] = med
        for key in rounds:
            bd[f"{key}_cpu_median"] = {k: statistics.median(r[k] for r in rounds[key])
                                       for k in ("cpu_s", "prefill_steps_cpu_s", "decode_steps_cpu_s")}
        bd["prefill_share_of_wall"] = med["prefill_steps_s"] / med["wall_s"]
        # The ratio to transformers if one part ran at its roofline and the rest as measured.
        bd["ratio_measured"] = hf_s / med["wall_s"]
        bd["ratio_if_decode_free"] = hf_s / (med["prefill_steps_s"] + med["outside_steps_s"])
        bd["ratio_if_decode_at_roofline"] = hf_s / (med["prefill_steps_s"] + med["outside_steps_s"]
                                                    + med["decode_roofline_s_approx"])
        bd["ratio_if_prefill_at_roofline"] = hf_s / (med["prefill_roofline_s"] + med["outside_steps_s"]
                                                     + med["decode_steps_s"])
        bd["ratio_if_all_at_roofline"] = hf_s / (med["prefill_roofline_s"] + med["decode_roofline_s_approx"])
        log(f"  ratio to transformers {bd['ratio_measured']:.2f}x; if decode ran at its roofline "
            f"{bd['ratio_if_decode_at_roofline']:.2f}x, if decode were free {bd['ratio_if_decode_free']:.2f}x, "
            f"everything at its roofline {bd['ratio_if_all_at_roofline']:.2f}x")
    result["offline_breakdown"] = bd

    if hf is not None and ours_out is not None and ref_out is not None:
        agr = agreement(ours_out, ref_out)
        # A prompt that differs: is it padding numerics (matches unpadded HF) or a real difference?
        rechecks = []
        for i, (a, b) in enumerate(zip(ours_out, ref_out, strict=True)):
            if a != b and len(rechecks) < 4:
                alone = hf_generate(hf, [prompts[i]], args.max_tokens, dev)[0]
                rechecks.append({"prompt": i, "length": lens[i], "equal_to_hf_unpadded": a == alone,
                                 "common_prefix_unpadded": agreement([a], [alone])["common_prefix_tokens"][0]})
        agr["rechecked_unpadded"] = rechecks
        if torch_attn_out is not None:
            agr[f"{alt}_equal_to_native"] = torch_attn_out == ours_out
            agr[f"{alt}_sequences_equal_to_hf"] = agreement(torch_attn_out, ref_out)["sequences_equal"]
        result["agreement"] = agr
        log(f"agreement: {agr['sequences_equal']}/{agr['sequences']} sequences equal, "
            f"{agr['common_prefix_fraction']:.1%} of tokens in the common prefix; rechecks {rechecks}")
        del hf
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()

    del llm
    batches = [int(x) for x in args.step_batches.split(",")]
    contexts = [int(x) for x in args.step_contexts.split(",")]
    lengths = [int(x) for x in args.prefill_lengths.split(",")]
    most = max(max(batches) * (max(contexts) + args.step_decode_steps + 8), max(lengths) + 16)
    runner = _step_runner(args.model, args.dtype, dev, most, args.seed, attn, lin, lay)
    step_cases(runner, args, bw, mm, compare, alt, result)
    kb = min(16, max(batches))
    if dev == "cpu":  # CPU kernels (MKL, the CPU flash kernel): meaningless beside a GPU run
        log("kernels of the batched step on their own (bench/engine_kernels.py)")
        kern = {"decode_attention": engine_kernels.decode_attention_variants(shape, kb, contexts[0] + 4),
                "projections": [engine_kernels.projection_costs(shape, b, bw["gbps_read_plus_write"])
                                for b in sorted({1, kb})],
                "linear_kernel": engine_kernels.linear_kernel(shape, (1, 2, 4, 8, 16, 32), bw["gbps_read_plus_write"])}
        log(f"  decode attention, batch {kb}, CPU ms: " + ", ".join(
            f"{k} {v:.1f}" for k, v in kern["decode_attention"]["cpu_ms_per_step"].items()))
        for p in kern["projections"]:
            log(f"  projections, batch {p['batch']}, CPU ms: " + ", ".join(f"{k} {v:.1f}" for k, v in p["cpu_ms_per_step"].items())
                + f" (weights at copy bandwidth {p['weights_read_ms_at_copy_bw']:.1f} ms)")
        for m, rec in kern["linear_kernel"]["batches"].items():
            log(f"  projections, {m} rows, CPU ms: F.linear {rec['cpu_ms_per_step']['linear']:.1f}, "
                f"native {rec['cpu_ms_per_step']['native']:.1f}")
        result["kernels"] = kern
    # The older summary (bench/gpu_check.py reads it): the steps at the first context.
    result["decode"] = [{"batch": d["batch"], "step_s_median": d["step_s_median"],
                         "bound_over_achieved": d["roofline_over_achieved"]} for d in result["decode_steps"] if d["context"] == contexts[0] and d["layout"] == "contiguous"]
    log("prefill model steps against the matmul FLOP/s")
    pre: list[dict[str, Any]] = []
    pre_alt: list[dict[str, Any]] = []
    ab_prefill = compare and args.ab in PREFILL_ABS
    for n in lengths:
        recs = model_prefill(runner, n, mm["flops_per_s"], args.seed + n,
                             reps=1 if n > 2048 else (5 if ab_prefill else 2),
                             modes=("default", "alt") if ab_prefill and n <= 2048 else ("default",), ab=args.ab)
        for m, p in recs.items():
            p["loadavg_1"] = os.getloadavg()[0]
            (pre if m == "default" else pre_alt).append(p)
            log(f"  {n} tokens{', ' + alt.replace('_', ' ') if m == 'alt' else ''}: {p['tokens_per_s']:.0f} tok/s, "
                f"{p['flops_per_s'] / 1e9:.1f} GFLOP/s = {p['fraction_of_matmul']:.0%} of matmul, median step "
                f"{p['s_median'] * 1e3:.0f} ms (load {p['loadavg_1']:.1f})")
    result["prefill_steps"] = pre
    if pre_alt:
        result[f"prefill_steps_{alt}"] = pre_alt
    result["total_s"] = time.perf_counter() - t_all
    result["loadavg_at_end"] = list(os.getloadavg())

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    log(f"wrote {out_path}")


def print_table(r: dict[str, Any]) -> None:
    m, t = r["machine"], r["throughput"]
    print(f"\n{r['model']['name']} ({r['model']['dtype']}, {r['model']['params'] / 1e6:.1f}M params) on "
          f"{m.get('gpu_name') or m['cpu_model']}, {m['torch_threads']} threads")
    print(f"{'metric':<44}{'value':>14}")
    rows = [("copy bandwidth, GB/s (read + write)", f"{r['copy_bandwidth']['gbps_read_plus_write']:.1f}"),
            ("pdserve output tok/s (best)", f"{t['pdserve_tok_per_s_best']:.0f}")]
    if "transformers_tok_per_s_best" in t:
        rows += [("transformers output tok/s (best)", f"{t['transformers_tok_per_s_best']:.0f}"),
                 ("pdserve / transformers (best, median)", f"{t['speedup_best']:.2f}x {t['speedup_median']:.2f}x")]
    if "agreement" in r:
        a = r["agreement"]
        rows.append(("greedy sequences equal to transformers", f"{a['sequences_equal']}/{a['sequences']}"))
    alt = r.get("ab", {}).get("key", "torch_attention")
    if f"pdserve_{alt}" in t["seconds"]:
        rows.append((f"pdserve, {alt.replace('_', ' ')}: tok/s (med)",
                     f"{t['output_tokens'] / statistics.median(t['seconds'][f'pdserve_{alt}']):.0f}"))
    for d in r["decode_steps"] + r.get(f"decode_steps_{alt}", []):
        rows.append((f"decode b{d['batch']} ctx {d['context']}{' frag' if d['layout'] == 'fragmented' else ''} "
                     f"a:{d.get('decode_attention', '')} l:{d.get('decode_linear', '')}: ms (roof, share)",
                     f"{d['step_s_median'] * 1e3:.1f} ({d['roofline_s'] * 1e3:.1f}, {d['roofline_over_achieved']:.0%})"))
    for p in r["prefill_steps"]:
        rows.append((f"prefill {p['tokens']}: tok/s (share of matmul FLOP/s)",
                     f"{p['tokens_per_s']:.0f} ({p['fraction_of_matmul']:.0%})"))
    for k, v in rows:
        print(f"{k:<44}{v:>14}")


if __name__ == "__main__":
    main()
