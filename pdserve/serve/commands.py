"""The `router` and `up` subcommands; their settings' flags are generated from `pdserve.config.schema`."""

from __future__ import annotations

import argparse
import sys


def _addresses(s: str) -> list[str]:
    return [a.strip() for a in s.split(",") if a.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    from pdserve.config.flags import add_cluster_flags, add_router_flags

    r = sub.add_parser("router", help="the OpenAI front of a cluster of prefill/decode/colocated workers")
    g = r.add_argument_group("workers")
    g.add_argument("--prefill", type=_addresses, default=[], help="host:port,... of prefill workers")
    g.add_argument("--decode", type=_addresses, default=[], help="host:port,... of decode workers")
    g.add_argument("--colocated", type=_addresses, default=[], help="host:port,... of colocated workers")
    add_router_flags(r)
    r.set_defaults(func=_run_router)

    u = sub.add_parser("up", help="start a router and its workers on this machine (or on Ray: --launcher ray)")
    add_cluster_flags(u)
    u.set_defaults(func=_run_up)

    from pdserve.serve.admin import ROLES, SWITCH_GRACE_S

    s = sub.add_parser("role", help="switch a running cluster worker's role (prefill, decode, colocated) "
                                    "without restarting it")
    s.add_argument("--router", required=True, help="the router's URL, e.g. http://127.0.0.1:8000")
    s.add_argument("--api-key", default="", help="the router's API key, if it requires one (default: none)")
    s.add_argument("--grace-s", type=float, default=SWITCH_GRACE_S,
                   help="seconds the worker lets what it holds finish before handing it back to the router")
    s.add_argument("name", help="the worker, as the router names it (role@host:port; see /health)")
    s.add_argument("role", choices=ROLES, help="its new role")
    s.set_defaults(func=_run_role)


def _run_up(args: argparse.Namespace) -> int:
    from pdserve.config.flags import cluster_from_args
    from pdserve.config.model import resolve_shape
    from pdserve.launch.serving import run_cluster

    cfg = cluster_from_args(args)
    resolve_shape(cfg.model, cfg.dtype or None)  # a bad model fails here, before any worker starts
    capacity = None
    if cfg.planner.mode == "sla":
        # The planner's performance model is the one `pdserve plan` uses (sim/), handed to the
        # launch layer from here, the one layer allowed to know both; a bad profile fails now.
        from pdserve.sim.capacity import for_cluster

        capacity = for_cluster(cfg)
    return run_cluster(cfg, capacity=capacity)


def router_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The router's settings: `--config` and flags, with the worker counts of the addresses given
    (so a file's counts never disagree with them, and the cluster's checks apply)."""
    from pdserve.config.flags import cluster_from_args

    return cluster_from_args(args, extra={role: {"workers": len(getattr(args, role))}
                                          for role in ("prefill", "decode", "colocated")})


def _run_router(args: argparse.Namespace) -> int:
    import logging

    from pdserve.config.model import resolve_shape

    if not (args.prefill or args.decode or args.colocated):
        print("pdserve router: give at least one of --prefill/--decode/--colocated", file=sys.stderr)
        return 2
    cfg = router_config(args)
    shape = resolve_shape(cfg.model)

    import uvicorn

    from pdserve.model.tokenizer import load_tokenizer
    from pdserve.serve.frontend import OpenAIFront
    from pdserve.serve.router import ClusterBackend
    from pdserve.serve.rpc import cluster_secret

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    r = cfg.router
    backend = ClusterBackend(shape, args.prefill, args.decode, args.colocated, secret=cluster_secret(), config=r)
    front = OpenAIFront(backend, load_tokenizer(cfg.model), cfg.public_model_name, api_key=r.api_key or None)
    uvicorn.run(front.app(), host=r.host, port=r.port, log_level="warning")
    return 0


def _run_role(args: argparse.Namespace) -> int:
    """POST /admin/workers/{name}/role; prints the router's answer, exit 1 if it refused."""
    from urllib.parse import quote

    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = f"{args.router.rstrip('/')}/admin/workers/{quote(args.name, safe='')}/role"
    try:
        r = httpx.post(url, json={"role": args.role, "grace_s": args.grace_s}, headers=headers,
                       timeout=args.grace_s + 660)
    except httpx.HTTPError as e:
        print(f"pdserve role: cannot reach {args.router}: {e}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        try:
            why = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            why = r.text
        print(f"pdserve role: {r.status_code}: {why}", file=sys.stderr)
        return 1
    body = r.json()
    print(f"{body['worker']} now serves as {body['role']}")
    return 0
