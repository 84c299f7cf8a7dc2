"""`pdserve up`: a launcher's workers (local processes or Ray actors) behind a router in this process.

The router's pools follow the launcher: every `FOLLOW_S` the workers the launcher lists are
compared with the router's, and the difference joins or leaves the router. So a worker that a
launcher adds, removes, or restarts under a new address (Ray) is in the right pool within a
second, with no call from the worker or the caller. Ctrl-C / SIGTERM stops the router, then the
launcher's workers (they drain first).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from pdserve.config.schema import ClusterConfig, ConfigError
from pdserve.launch.base import Launcher, make_launcher
from pdserve.launch.local import free_port
from pdserve.sched.sla_planner import CapacityModel

log = logging.getLogger("pdserve.launch")
FOLLOW_S = 0.5


async def follow(backend: Any, launcher: Launcher, interval: float = FOLLOW_S) -> None:
    """Keep the router's launcher-started workers equal to the launcher's, forever (cancel to stop)."""
    known: set[str] = set()
    while True:
        await asyncio.sleep(interval)
        try:
            await sync_pools(backend, launcher, known)
        except Exception:  # a launcher hiccup must not end the router; the next round retries
            log.exception("could not sync the router's pools with the launcher")


async def sync_pools(backend: Any, launcher: Launcher, known: set[str] | None = None) -> None:
    """One round of `follow`: add the launcher's new workers to the router, remove its gone ones.

    Workers are matched by address, not (role, address): a worker that switched roles at runtime
    (POST /admin/workers/{name}/role) is the same worker, in the pool its heartbeat names, however
    the launcher started it. `known` (kept across rounds) holds the addresses the launcher has
    reported: only those are removed when it stops reporting them, so a worker joined through
    POST /admin/workers stays."""
    roles = {h.address: h.role for h in await asyncio.to_thread(launcher.workers)}
    wanted = set(roles)
    have = {w.client.address for w in backend.workers}
    for address in sorted(wanted - have):
        await backend.add_worker(roles[address], address)
    gone = have - wanted if known is None else (have & known) - wanted
    for address in sorted(gone):
        await backend.remove_worker(address)
    if known is not None:
        known -= gone
        known |= wanted


def _serve_until_signal(server: Any, backend: Any, launcher: Launcher, planner: Any = None) -> None:
    """Serve (and follow the launcher) until SIGINT/SIGTERM, then return (uvicorn alone would
    re-raise the signal and kill this process before it could stop the workers)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():  # else (tests) the caller stops it
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        server.capture_signals = contextlib.nullcontext  # keep our handlers
        follower = asyncio.create_task(follow(backend, launcher))
        planning = asyncio.create_task(planner.run()) if planner is not None else None  # --planner sla
        try:
            await server.serve()
        finally:
            follower.cancel()
            if planning is not None:
                planning.cancel()

    asyncio.run(main())


def _log_decisions() -> None:
    """The planner's decisions (INFO, one JSON line each) on stdout, where `pdserve up` prints."""
    plog = logging.getLogger("pdserve.planner")
    if not plog.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        plog.addHandler(h)
        plog.setLevel(logging.INFO)


def _router_parts(model: str) -> Any:
    """The router's modules, imported, and the model's tokenizer (in a thread, beside the workers' start)."""
    import uvicorn  # noqa: F401

    import pdserve.serve.frontend  # noqa: F401
    import pdserve.serve.router  # noqa: F401
    from pdserve.model.tokenizer import load_tokenizer

    return load_tokenizer(model)


def run_cluster(cfg: ClusterConfig, launcher: Launcher | None = None,
                serving: Callable[[Any, str], None] | None = None, capacity: CapacityModel | None = None) -> int:
    """Start everything, serve until interrupted, stop everything. `serving(server, url)` is
    called once the router is about to serve (a caller in another thread stops it by setting
    `server.should_exit`). `capacity`: the performance model `planner: sla` plans with (the CLI
    builds it with `pdserve.sim.capacity.for_cluster`, the model `pdserve plan` uses; launch/ does
    not import sim/)."""
    from pdserve.config.model import resolve_shape

    # A given secret lets workers started elsewhere join (POST /admin/workers); else a fresh one.
    if cfg.planner.mode == "sla":  # fail before any worker starts
        from pdserve.serve.planner_loop import require_switch
        from pdserve.serve.router import ClusterBackend

        require_switch(ClusterBackend)
        if capacity is None:
            raise ConfigError("planner: sla needs the performance model to plan with (run_cluster(..., "
                              "capacity=pdserve.sim.capacity.for_cluster(cfg)), as `pdserve up` does)")
    secret = os.environ.get("PDSERVE_CLUSTER_SECRET") or secrets.token_hex(16)
    shape = resolve_shape(cfg.model, cfg.dtype or None)  # fail fast on a bad model, before forking
    r = cfg.router
    launcher = launcher or make_launcher(cfg)
    where = " on Ray" if cfg.launch.launcher == "ray" else ""
    print(f"pdserve: starting {cfg.prefill.workers} prefill, {cfg.decode.workers} decode, "
          f"{cfg.colocated.workers} colocated worker(s) for {cfg.model}{where}...", flush=True)
    # The router's own imports (torch, transformers, fastapi) and its tokenizer load while the
    # workers start, not before: `up` is ready seconds sooner.
    parts = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pdserve-router-load")
    tokenizer = parts.submit(_router_parts, cfg.model)
    parts.shutdown(wait=False)
    try:
        workers = launcher.start(secret)
        import uvicorn

        from pdserve.serve.frontend import OpenAIFront
        from pdserve.serve.router import ClusterBackend

        by_role = {role: [w.address for w in workers if w.role == role] for role in ("prefill", "decode", "colocated")}
        backend = ClusterBackend(shape, by_role["prefill"], by_role["decode"], by_role["colocated"],
                                 secret=secret.encode(), config=r)
        name = cfg.public_model_name
        front = OpenAIFront(backend, tokenizer.result(), name, api_key=r.api_key or None)
        port = r.port or free_port()  # --port 0: pick one, and print the real one
        auth = f' -H "Authorization: Bearer {r.api_key}"' if r.api_key else ""
        url = f"http://{r.host}:{port}"
        print(f"pdserve: serving {name} at {url}/v1  (metrics: {url}/metrics)\n"
              f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
              f"""-d '{{"model": "{name}", "prompt": "Hello, my name is", "max_tokens": 16, "temperature": 0}}'\n"""
              f"  Ctrl-C stops the cluster.", flush=True)
        server = uvicorn.Server(uvicorn.Config(front.app(), host=r.host, port=port, log_level="warning",
                                               timeout_graceful_shutdown=30))
        planner = None
        if cfg.planner.mode == "sla":
            from pdserve.serve.planner_loop import from_config

            planner = from_config(cfg, backend, front.metrics.registry, capacity, launcher)
            _log_decisions()
            print(f"pdserve: SLA planner every {cfg.planner.interval_s:g} s (p90 TTFT {cfg.planner.slo_ttft_ms:g} ms, "
                  f"TPOT {cfg.planner.slo_tpot_ms:g} ms)", flush=True)
        if serving is not None:
            serving(server, url)
        _serve_until_signal(server, backend, launcher, planner)
    finally:
        print("pdserve: stopping workers (finishing in-flight work)...", flush=True)
        launcher.stop()
    return 0
