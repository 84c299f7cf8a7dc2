"""The `pdserve` command."""

from __future__ import annotations

import argparse
import sys


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    from pdserve.serve.engine_args import EngineArgs

    p = sub.add_parser("serve", help="run one worker (colocated, prefill or decode)")
    p.add_argument("--role", choices=["colocated", "prefill", "decode"], default="colocated")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this Bearer key on the HTTP API")
    EngineArgs.add_flags(p)
    g = p.add_argument_group("cluster roles (prefill, decode, or colocated behind a router)")
    g.add_argument("--internal", action="store_true",
                   help="colocated role: speak the router's internal RPC instead of HTTP")
    g.add_argument("--max-waiting", type=int, default=256, help="queued requests before refusing more")
    g.add_argument("--transport", choices=["tcp", "shm"], default="tcp", help="KV transfer transport")
    g.add_argument("--bandwidth-gbps", type=float, default=0.0, help="emulated link bandwidth (0: off)")
    g.add_argument("--latency-ms", type=float, default=0.0, help="emulated link latency per chunk")
    g.add_argument("--transfer-timeout-s", type=float, default=30.0)
    g.add_argument("--fault-corrupt-prob", type=float, default=0.0, help="fault injection: corrupt KV chunks")
    g.add_argument("--fault-cut-prob", type=float, default=0.0, help="fault injection: cut KV connections")
    g.add_argument("--max-batch-tokens", type=int, default=2048, help="prefill: saturation token budget")
    g.add_argument("--max-wait-ms", type=float, default=50.0, help="prefill: longest wait before a batch")
    g.add_argument("--target-utilization", type=float, default=0.85, help="prefill: batch start threshold")
    g.add_argument("--length-buckets", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="prefill: e.g. 512,1024,2048")
    g.add_argument("--max-batch-size", type=int, default=64, help="decode: sequences per step")
    g.add_argument("--adaptive-batch", action="store_true", help="decode: batch grows with queue depth")
    g.add_argument("--tpot-target-ms", type=float, default=0.0, help="decode: bound for the adaptive batch")

    def run(args: argparse.Namespace) -> int:
        from pdserve.serve.worker import run_serve

        return run_serve(args)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    for module in ("pdserve.serve.commands", "pdserve.sim.commands", "pdserve.bench.commands"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
