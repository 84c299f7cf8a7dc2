"""CLI subcommands of the simulator: `sim`, `plan`, `kv-size`, `transfer-time`, `profile`.

`profile` runs the real engine (torch): its code lives in `pdserve/engine/profiler.py` and is imported
only inside its handler, so this module (and all of `pdserve/sim/`) stays torch-free.

`pdserve/cli.py` calls `register(sub)`; until then: `python -m pdserve.sim.commands sim ...`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from pdserve.config.model import resolve_shape
from pdserve.config.schema import CacheConfig
from pdserve.sim.calculators import fmt_bytes, kv_size, layered_transfer, transfer_time
from pdserve.sim.hardware import LINKS, get_link, parse_prices
from pdserve.sim.metrics import SLO
from pdserve.workload import PRESETS, generate


def _kv_size(args: argparse.Namespace) -> int:
    shape = resolve_shape(args.model)
    k = kv_size(shape, args.tokens, args.dtype)
    print(f"{args.model}: {shape.num_layers} layers, {shape.num_heads} query heads, {shape.num_kv_heads} KV heads, "
          f"head_dim {shape.head_dim}, {args.dtype or shape.dtype}")
    print(f"  KV per token:    {k.bytes_per_token:>14,} B  (full MHA would be {k.bytes_per_token_mha:,} B, "
          f"{k.bytes_per_token_mha / k.bytes_per_token:.0f}x)")
    print(f"  KV for {args.tokens:,} tokens: {k.bytes_per_sequence:>14,} B = {fmt_bytes(k.bytes_per_sequence)}  "
          f"(MHA: {fmt_bytes(k.bytes_per_sequence_mha)})")
    return 0


def _transfer_time(args: argparse.Namespace) -> int:
    if args.bytes is None:
        if not (args.model and args.tokens):
            print("transfer-time: give --bytes, or --model and --tokens", file=sys.stderr)
            return 2
        shape = resolve_shape(args.model)
        nbytes, layers = float(shape.kv_bytes_per_token() * args.tokens), args.layers or shape.num_layers
    else:
        nbytes, layers = float(args.bytes), args.layers
    links = list(LINKS) if args.link == "all" else [args.link]
    for name in links:
        link = get_link(name)
        t = transfer_time(nbytes, link)
        print(f"{link.name:<26} {fmt_bytes(nbytes)}: {link.latency_s * 1e3:.3f} ms + {fmt_bytes(nbytes)} / "
              f"({link.bandwidth / 1e9:.2f} GB/s x {link.efficiency}) = {t * 1e3:,.2f} ms")
        if layers and args.prefill_ms is not None:
            lt = layered_transfer(nbytes, link, layers, args.prefill_ms / 1e3)
            print(f"{'':<26} per layer ({layers} chunks of {fmt_bytes(nbytes / layers)}): {lt.per_layer_s * 1e3:.3f} ms "
                  f"each; overlapping a {args.prefill_ms:g} ms prefill the last byte lands "
                  f"{lt.exposed_s * 1e3:.2f} ms after prefill ends ({'link' if lt.link_bound else 'prefill'}-bound)")
    return 0


def sim_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The cluster of `--config` and the cluster flags (read as `pdserve up` reads them) on the
    hardware of the sim flags."""
    from pdserve.config.flags import overrides
    from pdserve.config.load import cluster_from_dict, merge, read_file
    from pdserve.sim.build import SimConfig, with_workers

    data = merge(read_file(args.config) if args.config else {}, overrides(args))
    mode = args.mode or ("colocated" if args.instances else None)
    cluster = cluster_from_dict(with_workers(data, mode, None, None, args.instances))
    return SimConfig(cluster, prefill_gpu=args.gpu, decode_gpu=args.decode_gpu or args.gpu, tp_prefill=args.tp,
                     tp_decode=args.decode_tp or args.tp, link=args.link, profile=args.profile)


def _sim(args: argparse.Namespace) -> int:
    from pdserve.sim.build import build
    from pdserve.sim.metrics import format_summary, summarize

    if args.scenario == "seed":
        from pdserve.sim.scenario import format_seed, run_seed

        r = run_seed(args.num_requests or 400)
        print(format_seed(r))
        if args.output:
            Path(args.output).write_text(json.dumps(r, indent=1))
        return 0
    cfg = sim_config(args)
    specs = generate(args.workload, args.num_requests, args.rate, args.arrival, args.burstiness, args.seed,
                     trace=args.trace, time_scale=args.time_scale)
    r = build(cfg).run(specs, progress=len(specs) >= 2000 and sys.stderr.isatty())
    from pdserve.bench.report import header

    res = summarize(r, SLO(args.ttft_slo, args.tpot_slo), {**header({}), "cluster": cfg.as_dict(), "label": cfg.label(),
                                                         "gpus": cfg.num_gpus, "cost_per_hour": cfg.cost_per_hour(),
                                                         "request_rate": args.rate})
    print(f"cluster: {cfg.label()} ({cfg.num_gpus} GPUs, ${cfg.cost_per_hour():.2f}/h)")
    print(format_summary(res))
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=1))
    if args.plot:
        from pdserve.sim.plots import plot_sim

        plot_sim(r, args.plot, cfg.label())
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pdserve.sim.planner import PlanInput, format_plan, plan_colocated, plan_disagg, retime

    if args.map:
        return _plan_map(args)
    base = generate(args.workload, args.num_requests, 1.0, seed=args.seed, trace=args.trace)
    slo = SLO(args.ttft_slo, args.tpot_slo)
    prices = parse_prices(args.price)
    rates = [float(x) for x in args.sweep_rate.split(",")] if args.sweep_rate else [args.rate]
    t0 = time.process_time()
    rows = []
    for rate in rates:
        inp = PlanInput(args.model, rate, retime(base, rate, args.seed), slo, args.gpus.split(","), args.target,
                        args.link, prices)
        dis, col = plan_disagg(inp), plan_colocated(inp)
        print(format_plan(dis, col, inp))
        rows.append({"rate": rate, "disagg": dis and {"label": dis.config.label(), "cost": dis.cost},
                     "colocated": col and {"label": col.config.label(), "cost": col.cost}})
    if len(rows) > 1:
        pays = next((r["rate"] for r in rows if r["disagg"] and (not r["colocated"]
                                                                  or r["disagg"]["cost"] < r["colocated"]["cost"])), None)
        print(f"disaggregation starts to pay at {pays:g} req/s" if pays else "disaggregation never paid in this sweep")
    cpu = time.process_time() - t0
    print(f"searched {len(rates)} rate(s) in {cpu:.1f} s CPU")
    if args.output:
        from pdserve.bench.report import header

        Path(args.output).write_text(json.dumps({**header({}), "cpu_s": cpu, "slo": slo.as_dict(),
                                                 "target": args.target, "rows": rows}, indent=1))
    if args.plot:
        from pdserve.sim.plots import plot_sweep

        plot_sweep(rows, args.plot, f"{args.model}, {args.trace or args.workload}, SLO {slo.as_dict()}")
    return 0


def _plan_map(args: argparse.Namespace) -> int:
    from pdserve.sim.map import MapInput, format_map, plot_map, run_map

    inp = MapInput(args.model, args.gpus.split(","), args.link, SLO(args.ttft_slo, args.tpot_slo),
                   [int(x) for x in args.prompts.split(",")], [int(x) for x in args.outputs.split(",")],
                   args.target, args.num_requests, parse_prices(args.price), args.seed)
    res = run_map(inp, progress=sys.stderr.isatty() or args.progress)
    from pdserve.bench.report import header

    res = {**header({}), "command": "pdserve " + " ".join(sys.argv[1:]), **res}
    print(format_map(res))
    print(format_map(res, "ratio_per_dollar"))
    print(f"{len(res['points'])} points in {res['cpu_s']:.0f} s CPU")
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=1))
    if args.plot:
        plot_map(res, args.plot)
    return 0


def _profile(args: argparse.Namespace) -> int:
    from pdserve.engine.profiler import main as profile_main  # torch: only when profiling

    return profile_main(args)


# Settings of the cluster file the simulator does not model (process details, the HTTP front, link
# emulation: the hardware flags say what the link is); it reads the file with them all the same.
SIM_IGNORES = ("seed", "device", "threads", "served_model_name", "max_waiting",
               *(f"transfer.{k}" for k in ("transport", "bandwidth_gbps", "latency_ms", "max_frame_bytes",
                                           "timeout_s", "fault_corrupt_prob", "fault_cut_prob")),
               *(f"router.{k}" for k in ("host", "port", "api_key", "max_inflight", "reserve_timeout_s",
                                         "first_token_timeout_s", "token_timeout_s", "request_timeout_s",
                                         "backoff_base_s", "backoff_max_s", "stats_interval_s",
                                         "breaker_failures", "breaker_reset_s", "breaker_probe_timeout_s",
                                         "max_attempts")))


def register(sub: argparse._SubParsersAction) -> None:
    from pdserve.config.flags import add_cluster_flags

    """Add `sim`, `plan`, `kv-size`, `transfer-time` and `profile` to the `pdserve` command."""
    p = sub.add_parser("kv-size", help="KV cache bytes per token and per sequence (GQA vs MHA)")
    p.add_argument("--model", default="demo", help="catalog name or HF folder (its config.json)")
    p.add_argument("--tokens", type=int, default=1, help="sequence length")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="KV dtype (default: the model's)")
    p.set_defaults(func=_kv_size)

    p = sub.add_parser("transfer-time", help="KV transfer time over a link (base latency + size / bandwidth)")
    p.add_argument("--bytes", type=float, help="bytes to move (or give --model and --tokens)")
    p.add_argument("--model", help="catalog name or HF folder: its KV for --tokens")
    p.add_argument("--tokens", type=int, help="sequence length whose KV is moved")
    p.add_argument("--link", default="all", help=f"one of {', '.join(LINKS)} or 'all'")
    p.add_argument("--layers", type=int, help="send in this many per-layer chunks (none: one piece; with --model: its layer count)")
    p.add_argument("--prefill-ms", type=float, help="prefill time the per-layer chunks overlap")
    p.set_defaults(func=_transfer_time)

    def common(p: argparse.ArgumentParser, model: bool = True) -> None:
        if model:
            p.add_argument("--model", default="llama-3.1-8b", help="catalog name or HF folder (its config.json)")
        p.add_argument("--workload", default="chatbot", choices=list(PRESETS), help="request length preset")
        p.add_argument("--trace", help="CSV trace (arrived_at,num_prefill_tokens,num_decode_tokens)")
        p.add_argument("--num-requests", type=int, default=0, help="requests to simulate")
        p.add_argument("--seed", type=int, default=0, help="workload seed")
        p.add_argument("--ttft-slo", type=float, help="time-to-first-token SLO, ms")
        p.add_argument("--tpot-slo", type=float, help="time-per-output-token SLO, ms")
        p.add_argument("--link", default="cx7-400g", choices=list(LINKS), help="KV link between instances")
        p.add_argument("--output", help="write the JSON here")
        p.add_argument("--plot", help="write a PNG here")

    p = sub.add_parser("sim", help="simulate a cluster: the one `pdserve up` starts from the same --config/flags, "
                                   "on the hardware given here")
    common(p, model=False)
    p.add_argument("--scenario", choices=["seed"], help="a built-in scenario instead of one cluster")
    p.add_argument("--mode", choices=["disagg", "colocated"],
                   help="keep only prefill + decode workers, or only colocated ones (default: as configured)")
    p.add_argument("--instances", type=int, help="colocated instances (implies --mode colocated)")
    g = p.add_argument_group("hardware")
    g.add_argument("--gpu", default="h100", help="GPU of prefill (and colocated) instances")
    g.add_argument("--decode-gpu", help="GPU of decode instances (default: --gpu)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of prefill (and colocated) instances")
    g.add_argument("--decode-tp", type=int, help="tensor-parallel degree of decode instances (default: --tp)")
    g.add_argument("--profile", help="profile JSON (pdserve profile) instead of the roofline")
    g = p.add_argument_group("arrivals")
    g.add_argument("--rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    g.add_argument("--arrival", default="poisson", choices=["poisson", "gamma", "trace"], help="arrival process")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma arrivals: shape (1 = poisson)")
    g.add_argument("--time-scale", type=float, default=1.0, help="trace: multiply its times by this")
    add_cluster_flags(p, skip=SIM_IGNORES)
    p.set_defaults(func=_sim, num_requests=200)

    p = sub.add_parser("profile", help="time the real engine on this machine; write a profile for sim --profile")
    p.add_argument("--model", default="demo", help="HF model folder or a catalog name (dummy weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the model's")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: as a cluster's workers on this machine run; 0: torch's default)")
    p.add_argument("--out", default="profile.json", help="where the profile JSON goes")
    p.add_argument("--prefill-tokens", default="16,32,64,128,256,512,1024", help="comma-separated prompt lengths")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32", help="comma-separated decode batch sizes")
    p.add_argument("--contexts", default="64,128,256,512,1024", help="comma-separated decode context lengths")
    p.add_argument("--block-size", type=int, default=CacheConfig().block_size, help="tokens per KV block")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per point")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point (the median is kept)")
    p.set_defaults(func=_profile)

    p = sub.add_parser("plan", help="cheapest cluster meeting the SLOs: disaggregated vs colocated")
    common(p)
    p.add_argument("--gpus", default="h100", help="comma-separated GPU types to consider")
    p.add_argument("--rate", type=float, default=10.0, help="request rate to plan for (req/s)")
    p.add_argument("--sweep-rate", help="comma-separated rates, e.g. 1,2,5,10,20")
    p.add_argument("--target", type=float, default=0.9, help="SLO attainment target")
    p.add_argument("--price", action="append", help="GPU=USD per GPU-hour (repeatable)")
    g = p.add_argument_group("map (--map: disaggregated vs colocated goodput over prompt x output lengths)")
    g.add_argument("--map", action="store_true", help="sweep --prompts x --outputs (each point: the best P:D "
                   "and TP against the best colocated; rate searched to the goodput); --num-requests per run")
    g.add_argument("--prompts", default="128,512,2048,8192", help="comma-separated prompt lengths")
    g.add_argument("--outputs", default="8,32,128,512", help="comma-separated output lengths")
    g.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is no terminal")
    p.set_defaults(func=_plan, num_requests=200, ttft_slo=2000.0, tpot_slo=100.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
