"""The `pdserve` command."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (generated flags already say it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or action.default is argparse.SUPPRESS or isinstance(
                action, argparse._HelpAction | argparse._SubParsersAction) or not action.option_strings:
            return text
        default = action.default
        shown = "none" if default is None else ("off" if default is False else "%(default)s")
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `pdserve up: --decode: invalid int value: 'x'`, exit status 2."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    from pdserve.config.flags import add_worker_flags

    p = sub.add_parser("serve", help="run one worker (colocated, prefill or decode)")
    p.add_argument("--role", choices=["colocated", "prefill", "decode"], default="colocated",
                   help="the worker's policy; prefill and decode workers serve a router")
    p.add_argument("--internal", action="store_true",
                   help="colocated role: speak the router's internal RPC instead of HTTP")
    add_worker_flags(p)

    def run(args: argparse.Namespace) -> int:
        from pdserve.serve.engine_args import parse_settings

        parse_settings(args)  # bad settings fail here, in a second, before torch is imported
        from pdserve.serve.worker import run_serve

        return run_serve(args)

    p.set_defaults(func=run)


def _config_parser(sub: argparse._SubParsersAction) -> None:
    from pdserve.config.flags import add_cluster_flags

    p = sub.add_parser("config", help="print every setting of a cluster file with its default and help, "
                                      "or (with --config / flags) the cluster they describe")
    add_cluster_flags(p)

    def run(args: argparse.Namespace) -> int:
        from pdserve.config.flags import cluster_from_args, overrides
        from pdserve.config.schema import reference_yaml

        if args.config is None and not overrides(args):
            print(reference_yaml(), end="")
            return 0
        import yaml

        from pdserve.config.load import to_dict

        print(yaml.safe_dump(to_dict(cluster_from_args(args)), sort_keys=False), end="")
        return 0

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _config_parser(sub)
    for module in ("pdserve.serve.commands", "pdserve.sim.commands", "pdserve.bench.commands", "pdserve.top"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pdserve.config.model import ModelConfigError
    from pdserve.config.schema import ConfigError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # name the subcommand, not `pdserve`, in the message
        prog = f"pdserve {args.command}"
        parser.exit(2, f"{prog}: unrecognized arguments: {' '.join(rest)} (see {prog} --help)\n")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, ModelConfigError) as e:  # a user's mistake: one line, no traceback
        print(f"pdserve {args.command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing file, a port in use: the user's environment, not a bug
        print(f"pdserve {args.command}: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2


SERVERS = ("serve", "up", "router")  # long-running commands whose work is all done when main() returns


def _exit_without_teardown(code: int) -> NoReturn:
    """Exit as the interpreter would, less its teardown: freeing torch's modules and a worker's KV
    memory took 1.5 s after a server had stopped (and `up` waits for its workers to exit).
    Non-daemon threads are joined and atexit handlers (logging, Ray, multiprocessing) run first."""
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    status = main()
    if sys.argv[1:2] and sys.argv[1] in SERVERS:
        _exit_without_teardown(status)
    sys.exit(status)
