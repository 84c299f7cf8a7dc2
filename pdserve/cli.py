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
