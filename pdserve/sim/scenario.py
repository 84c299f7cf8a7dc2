"""`pdserve sim --scenario seed`: the worked example of the article pdserve was designed from
(Llama-3-70B, 2,000-token prompts, 8 prefill + 32 decode GPUs), as our performance model predicts it.

The article's claims: 5.12 GB of KV per 2,000-token sequence; ~50 ms to move it over 100 Gb/s RDMA;
6.37x throughput for 8 prefill + 32 decode GPUs over 8 monolithic GPUs. Each is recomputed here
with the arithmetic shown, and the clusters are simulated at saturation (all requests at t=0)
per GPU, in total, and at equal GPU count.
"""

from __future__ import annotations

from typing import Any

from pdserve.config.model import resolve_shape
from pdserve.sim.build import GPU_SCALE, SimConfig, build
from pdserve.sim.calculators import transfer_time
from pdserve.sim.hardware import get_gpu, get_link
from pdserve.sim.metrics import summarize
from pdserve.workload import RequestSpec

MODEL, PROMPT, OUTPUT, TP = "llama-3-70b", 2000, 256, 4


def _clusters() -> dict[str, SimConfig]:
    # 70B bf16 is 141 GB of weights: TP4 on H100 (80 GB) is the usual choice, so 8 GPUs = 2 instances.
    c = dict(model=MODEL, tp_prefill=TP, tp_decode=TP, link="rdma-100g", serving=GPU_SCALE)
    return {
        "monolithic 8 GPUs (2x TP4)": SimConfig.of(mode="colocated", num_colocated=2, **c),
        "disagg 8P+32D GPUs (2+8 x TP4)": SimConfig.of(mode="disagg", num_prefill=2, num_decode=8, **c),
        "monolithic 40 GPUs (10x TP4)": SimConfig.of(mode="colocated", num_colocated=10, **c),
        "disagg 8 GPUs (1P+1D x TP4)": SimConfig.of(mode="disagg", num_prefill=1, num_decode=1, **c),
    }


def run_seed(num_requests: int = 400) -> dict[str, Any]:
    shape = resolve_shape(MODEL)
    kv_tok, kv_mha = shape.kv_bytes_per_token(), shape.kv_bytes_per_token_mha()
    link = get_link("rdma-100g")
    seq = kv_tok * PROMPT
    arith = {
        "kv_per_token_gqa_bytes": kv_tok,
        "kv_per_token_gqa": f"2 (K,V) x {shape.num_layers} layers x {shape.num_kv_heads} KV heads x "
                            f"{shape.head_dim} dims x 2 B = {kv_tok:,} B",
        "kv_per_token_mha": f"2 x {shape.num_layers} x {shape.num_heads} heads x {shape.head_dim} x 2 B = {kv_mha:,} B "
                            "(the seed's assumption)",
        "kv_per_sequence": f"{kv_tok:,} B x {PROMPT} = {seq / 1e9:.3f} GB (seed: 5.12 GB; MHA would be "
                           f"{kv_mha * PROMPT / 1e9:.2f} GB)",
        "transfer_100g": f"100 Gb/s = 12.5 GB/s; x{link.efficiency} efficiency; {seq / 1e9:.3f} GB -> "
                         f"{transfer_time(seq, link) * 1e3:.1f} ms (seed: 50 ms, which is 5.12 GB / 100 GB/s: "
                         f"bits read as bytes; 5.12 GB really takes {5.12e9 / (100e9 / 8) * 1e3:.0f} ms at line rate)",
        "transfer_100g_ms": transfer_time(seq, link) * 1e3,
    }
    specs = [RequestSpec(0.0, PROMPT, OUTPUT)] * num_requests
    rows: dict[str, Any] = {}
    for name, cfg in _clusters().items():
        res = summarize(build(cfg).run(specs))
        rows[name] = {
            "gpus": cfg.num_gpus,
            "cost_per_hour": cfg.cost_per_hour(),
            "completed": res["completed"],
            "num_preemptions": res["num_preemptions"],
            "output_throughput": res["output_throughput"],
            "output_throughput_per_gpu": res["output_throughput"] / cfg.num_gpus,
            "request_throughput": res["request_throughput"],
            "median_ttft_ms": res["median_ttft_ms"],
            "median_tpot_ms": res["median_tpot_ms"],
        }
    names = list(rows)
    mono8, dis40, mono40, dis8 = (rows[n] for n in names)
    ratios = {
        "total_40_vs_8 (the seed's 6.37x)": dis40["output_throughput"] / mono8["output_throughput"],
        "per_gpu_disagg40_vs_mono8": dis40["output_throughput_per_gpu"] / mono8["output_throughput_per_gpu"],
        "equal_gpus_40_disagg_vs_mono": dis40["output_throughput"] / mono40["output_throughput"],
        "equal_gpus_8_disagg_vs_mono": dis8["output_throughput"] / mono8["output_throughput"],
    }
    g = get_gpu("h100")
    limit = {
        "decode_hbm_bound_tok_s_per_instance_batch1": 1 / (shape.weight_bytes() / (TP * g.mem_bw)),
        "prefill_flop_bound_tok_s_per_gpu": g.bf16_flops / shape.flops_per_token(PROMPT // 2),
    }
    return {"model": MODEL, "prompt_tokens": PROMPT, "output_tokens": OUTPUT, "gpu": "h100", "tp": TP,
            "num_requests": num_requests, "arithmetic": arith, "clusters": rows, "ratios": ratios,
            "hardware_limits": limit,
            "seed_claims": {"kv_per_sequence_gb": 5.12, "transfer_ms_100g": 50, "throughput_ratio": 6.37}}


def format_seed(r: dict[str, Any]) -> str:
    a = r["arithmetic"]
    lines = ["The seed's example, recomputed (Llama-3-70B bf16, 2,000-token prompts, 256-token outputs, H100 TP4)",
             "", "KV size", f"  per token: {a['kv_per_token_gqa']}", f"  the seed's: {a['kv_per_token_mha']}",
             f"  per sequence: {a['kv_per_sequence']}", "Transfer", f"  {a['transfer_100g']}", "",
             f"Clusters at saturation ({r['num_requests']} requests at t=0):",
             f"  {'cluster':<34}{'GPUs':>5}{'done':>6}{'out tok/s':>11}{'per GPU':>9}{'TTFT p50':>10}{'TPOT p50':>10}"]
    for name, c in r["clusters"].items():
        lines.append(f"  {name:<34}{c['gpus']:>5}{c.get('completed', 0):>6}{c['output_throughput']:>11.0f}"
                     f"{c['output_throughput_per_gpu']:>9.0f}{c['median_ttft_ms']:>9.0f}ms{c['median_tpot_ms']:>8.1f}ms")
    lines.append("Ratios (seed claims 6.37x):")
    for k, v in r["ratios"].items():
        lines.append(f"  {k:<40}{v:6.2f}x")
    lim = r["hardware_limits"]
    lines.append(f"Hardware limits: a TP4 decode instance at batch 1 reads 141 GB of weights per step -> "
                 f"{lim['decode_hbm_bound_tok_s_per_instance_batch1']:.0f} tok/s at full HBM bandwidth; "
                 f"prefill FLOP bound {lim['prefill_flop_bound_tok_s_per_gpu']:,.0f} prompt tok/s per GPU at peak.")
    return "\n".join(lines)


