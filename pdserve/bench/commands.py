"""`pdserve bench run` (load one server) and `pdserve bench compare` (colocated vs disaggregated)."""

from __future__ import annotations

import argparse

from pdserve.bench.run import add_workload_flags


def _run_cmd(args: argparse.Namespace) -> int:
    from pdserve.bench.report import format_run, run_payload, write_json
    from pdserve.bench.run import prepare, run_once, workload_config

    prep = prepare(args, args.rate)
    res, run = run_once(args.url, args, prep)
    print(format_run(res))
    if args.out:
        write_json(args.out, run_payload({**workload_config(args), "url": args.url, "rate": args.rate}, res, run))
        print(f"wrote {args.out}")
    return 0 if res["completed"] else 1


def _compare_cmd(args: argparse.Namespace) -> int:
    from pdserve.bench.compare import run_compare

    return run_compare(args)


def _rescore_cmd(args: argparse.Namespace) -> int:
    from pdserve.bench.compare import rescore

    return rescore(args)


def _calibrate_cmd(args: argparse.Namespace) -> int:
    from pdserve.bench.calibrate import main

    return main(args)


def _calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure serving overheads and host-sharing factors on a lightly "
                                         "loaded real run; add them to a profile for sim --profile")
    p.add_argument("--profile", required=True, help="profile JSON from pdserve profile (updated in place)")
    p.add_argument("--model", default="demo", help="the model of the run to predict")
    p.add_argument("--workload", default="chatbot-small", help="request length preset")
    p.add_argument("--length-scale", type=float, default=0.25, help="multiply the preset's lengths by this")
    p.add_argument("--num-requests", type=int, default=16, help="requests per run")
    p.add_argument("--rate", type=float, default=0.5, help="requests/s (light load: overheads, not queueing)")
    p.add_argument("--seed", type=int, default=1, help="workload seed")
    p.add_argument("--workers", type=int, default=2, help="workers per cluster, as in the run to predict")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers of the disaggregated cluster")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--port", type=int, default=8660, help="router port of the runs")
    p.add_argument("--modes", default="colocated,disaggregated", help="comma-separated modes to calibrate")
    p.add_argument("--transfer", default="bench/results/transfer.json",
                   help="transfer bench results: the KV link is fitted to them")
    p.set_defaults(func=_calibrate_cmd)


def register(sub: argparse._SubParsersAction) -> None:
    _calibrate_parser(sub)
    bench = sub.add_parser("bench", help="benchmark a server, or colocated vs disaggregated side by side")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    run = bsub.add_parser("run", help="send a workload to a running server and report vllm-style metrics")
    run.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    run.add_argument("--rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    run.add_argument("--out", default=None, help="write the summary and every request's record here (JSON)")
    add_workload_flags(run)
    run.set_defaults(func=_run_cmd)

    cmp_ = bsub.add_parser("compare", help="colocated vs disaggregated on this machine, same workers, "
                                           "same workload, a sweep of rates; JSON, PNGs and a table")
    cmp_.add_argument("--workers", type=int, default=2, help="workers per cluster (N)")
    cmp_.add_argument("--prefill", type=int, default=None,
                      help="prefill workers in the disaggregated cluster (default N//2; decode gets the rest)")
    cmp_.add_argument("--rates", default="0.5,1,2,3", help="comma-separated request rates (req/s)")
    cmp_.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    cmp_.add_argument("--port", type=int, default=8600, help="router port (the clusters run one after another)")
    cmp_.add_argument("--out-dir", default="bench/results", help="where the JSON and PNGs go")
    cmp_.add_argument("--name", default=None, help="file name stem (default compare_<workload>)")
    cmp_.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for a cluster to start")
    add_workload_flags(cmp_)
    # Defaults sized for `demo` on 2 shared CPU cores (about 6 minutes): chatbot-small at a quarter of
    # its lengths (prompts 64-192, outputs 16-48 tokens).
    rs = bsub.add_parser("rescore", help="a compare run's table and plots again under other SLOs, from its "
                                         "recorded requests (no rerun)")
    rs.add_argument("json", help="the compare JSON")
    rs.add_argument("--name", required=True, help="file name stem of the rescored JSON and PNGs")
    rs.add_argument("--out-dir", default="bench/results", help="where the JSON and PNGs go")
    rs.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT SLO")
    rs.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT SLO")
    rs.add_argument("--slo-itl-ms", type=float, default=None, help="SLO on each request's worst inter-token gap")
    rs.set_defaults(func=_rescore_cmd)
    cmp_.set_defaults(func=_compare_cmd, num_requests=32, workload="chatbot-small", length_scale=0.25,
                      slo_ttft_ms=1000.0, slo_tpot_ms=100.0)
