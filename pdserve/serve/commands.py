"""The `router` and `up` subcommands."""

from __future__ import annotations

import argparse
import sys


def _addresses(s: str) -> list[str]:
    return [a.strip() for a in s.split(",") if a.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("router", help="the OpenAI front of a cluster of prefill/decode/colocated workers")
    r.add_argument("--model", default="demo")
    r.add_argument("--served-model-name", default=None)
    r.add_argument("--prefill", type=_addresses, default=[], help="host:port,... of prefill workers")
    r.add_argument("--decode", type=_addresses, default=[], help="host:port,... of decode workers")
    r.add_argument("--colocated", type=_addresses, default=[], help="host:port,... of colocated workers")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=8000)
    r.add_argument("--api-key", default=None)
    r.add_argument("--disagg-threshold", type=int, default=0,
                   help="prompts shorter than this many tokens skip the prefill pool")
    r.set_defaults(func=_run_router)

    u = sub.add_parser("up", help="start a router and its workers on this machine")
    u.add_argument("--config", default=None, help="cluster YAML (sections: prefill, decode, colocated, transfer, router)")
    u.add_argument("--model", default=None)
    u.add_argument("--prefill", type=int, default=None, help="prefill workers")
    u.add_argument("--decode", type=int, default=None, help="decode workers")
    u.add_argument("--colocated", type=int, default=None, help="colocated workers")
    u.add_argument("--transport", choices=["tcp", "shm"], default=None)
    u.add_argument("--bandwidth-gbps", type=float, default=None, help="emulated KV link bandwidth")
    u.add_argument("--latency-ms", type=float, default=None, help="emulated KV link latency")
    u.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1)")
    u.add_argument("--device", default=None)
    u.add_argument("--dtype", default=None)
    u.add_argument("--host", default=None)
    u.add_argument("--port", type=int, default=None)
    u.add_argument("--api-key", default=None)
    u.add_argument("--disagg-threshold", type=int, default=None)
    u.add_argument("--launcher", choices=["local"], default="local")
    u.set_defaults(func=_run_up)


def cluster_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The YAML file (if any) with the flags given on top."""
    from pdserve.config.cluster import cluster_from_dict, load_cluster_file

    cfg = load_cluster_file(args.config) if args.config else cluster_from_dict({})
    data = {
        "model": args.model or cfg.model,
        "device": args.device or cfg.device,
        "dtype": args.dtype if args.dtype is not None else cfg.dtype,
        "threads": args.threads if args.threads is not None else cfg.threads,
        "block_size": cfg.block_size, "kv_cache_memory_gb": cfg.kv_cache_memory_gb,
        "prefill": {**vars(cfg.prefill), **({"workers": args.prefill} if args.prefill is not None else {})},
        "decode": {**vars(cfg.decode), **({"workers": args.decode} if args.decode is not None else {})},
        "colocated": {**vars(cfg.colocated), **({"workers": args.colocated} if args.colocated is not None else {})},
        "transfer": {**vars(cfg.transfer), **{k: v for k, v in (
            ("transport", args.transport), ("bandwidth_gbps", args.bandwidth_gbps),
            ("latency_ms", args.latency_ms)) if v is not None}},
        "router": {**vars(cfg.router), **{k: v for k, v in (
            ("host", args.host), ("port", args.port), ("api_key", args.api_key),
            ("disagg_threshold", args.disagg_threshold)) if v is not None}},
    }
    return cluster_from_dict(data)


def _run_up(args: argparse.Namespace) -> int:
    from pdserve.config.engine import ConfigError
    from pdserve.config.model import ModelConfigError
    from pdserve.launch.local import run_cluster

    try:
        cfg = cluster_config(args)
    except (ConfigError, ModelConfigError) as e:
        print(f"pdserve up: {e}", file=sys.stderr)
        return 2
    return run_cluster(cfg)


def _run_router(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from pdserve.config.model import resolve_shape
    from pdserve.model.tokenizer import load_tokenizer
    from pdserve.serve.frontend import OpenAIFront
    from pdserve.serve.router import ClusterBackend, RouterConfig
    from pdserve.serve.rpc import cluster_secret

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not (args.prefill or args.decode or args.colocated):
        print("pdserve router: give at least one of --prefill/--decode/--colocated", file=sys.stderr)
        return 2
    backend = ClusterBackend(resolve_shape(args.model), args.prefill, args.decode, args.colocated,
                             secret=cluster_secret(),
                             config=RouterConfig(disagg_threshold=args.disagg_threshold))
    front = OpenAIFront(backend, load_tokenizer(args.model), args.served_model_name or args.model,
                        api_key=args.api_key)
    uvicorn.run(front.app(), host=args.host, port=args.port, log_level="warning")
    return 0
