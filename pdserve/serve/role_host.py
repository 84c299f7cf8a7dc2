"""One worker process across role switches: the RPC server the router talks to, and the role serving.

A switch (`SwitchRole` from the router) keeps the process, its loaded weights (ModelRunner), its KV
memory (BlockManager, prefix cache included), its RPC port and its counters (`Shared`), and swaps
the policy around them:

  old role drains ──▶ what it still holds after the grace period is handed back (a `draining`
  error: the router retries it elsewhere with the tokens streamed so far) ──▶ its engine thread and
  transfer plane stop ──▶ the new role's class is built over the same `Shared` ──▶ it starts and
  answers the RPC ──▶ RoleSwitched to the router.

While switching, Stats say `draining` and `switching=<new role>`, so the router keeps it out of
every pool until the switch is done, then puts it in its new role's pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from pdserve.serve import messages as m
from pdserve.serve.rpc import Peer

if TYPE_CHECKING:
    from pdserve.serve.worker_base import WorkerBase

log = logging.getLogger("pdserve.worker")


class RoleHost:
    """Runs `worker` (the first role) and the roles it switches to, until SIGTERM/SIGINT."""

    def __init__(self, worker: WorkerBase) -> None:  # type: ignore[type-arg]
        self.worker = worker
        self.args = worker.args
        self.rpc = worker.rpc
        self._switch_lock = asyncio.Lock()  # one switch at a time
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.worker.start_role()
        self._route_switches()
        await self.rpc.start()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        w = self.worker
        log.info("%s worker ready on %s:%d (%d KV blocks)", w.role, self.rpc.host, self.rpc.port, w.bm.num_blocks)
        print(f"READY {w.role} {self.rpc.host}:{self.rpc.port} pid={os.getpid()}", flush=True)
        await stop.wait()
        async with self._switch_lock:  # a switch under way completes first
            await self.worker.drain()
            await self.rpc.close()
            await self.worker.stop_role()

    def _route_switches(self) -> None:
        """SwitchRole is this host's to answer; everything else goes to the role serving now."""
        role_handler = self.worker._handle

        async def handle(msg: m.ToWorker, peer: Peer) -> None:
            if isinstance(msg, m.SwitchRole):  # in a task: the connection keeps reading (Aborts, Stats)
                task = asyncio.create_task(self._answer_switch(msg, peer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                await role_handler(msg, peer)

        self.rpc.handler = handle

    async def _answer_switch(self, msg: m.SwitchRole, peer: Peer) -> None:
        error = ""
        try:
            await self.switch(msg.role, msg.grace_s)
        except Exception as e:  # the reply says why; the worker serves on in whichever role it has
            log.exception("role switch to %s failed", msg.role)
            error = str(e) or type(e).__name__
        try:
            await peer.send(m.RoleSwitched(msg.nonce, self.worker.role, error))
        except (ConnectionError, OSError):
            log.info("router connection gone before the switch to %s was confirmed", msg.role)

    async def switch(self, role: str, grace_s: float) -> None:
        """Become `role` (a no-op if this already is it); see the module docstring."""
        from pdserve.serve.pd_worker import ROLES

        if role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
        async with self._switch_lock:
            old = self.worker
            if old.role == role:
                return
            log.info("switching from %s to %s (grace %.1fs)", old.role, role, grace_s)
            old.switching = role
            await hand_back(old, max(0.0, grace_s))
            await old.stop_role()
            try:
                new = ROLES[role](self.args, old.shared)
            except Exception:
                log.exception("could not build the %s role; going back to %s", role, old.role)
                new = ROLES[old.role](self.args, old.shared)
                self._start(new)
                raise
            self._start(new)
            log.info("now serving as %s on %s:%d", role, self.rpc.host, self.rpc.port)
            print(f"ROLE {role} {self.rpc.host}:{self.rpc.port} pid={os.getpid()}", flush=True)

    def _start(self, worker: WorkerBase) -> None:  # type: ignore[type-arg]
        self.worker = worker
        worker.start_role()
        self._route_switches()


async def hand_back(w: WorkerBase, grace_s: float, timeout: float = 60.0) -> None:  # type: ignore[type-arg]
    """Drain for a role switch: take no new work, let what is held finish for `grace_s`, then
    end what is left with a `draining` error (the router retries it elsewhere, with the tokens
    it already streamed: nothing is lost) and wait until nothing is held at all."""
    w.draining = True
    log.info("switching to %s: %d requests in flight", w.switching, len(w.requests))
    deadline = time.monotonic() + grace_s
    while (w.requests or w._busy()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    back = w._handed_back()
    if back:
        log.info("switching to %s: handing back %d requests to the router", w.switching, len(back))
    for rid in back:
        w._abort(rid)
        w._error_now(rid, f"worker is switching to {w.switching or 'another role'}", "draining")
    deadline = time.monotonic() + timeout
    while (w.requests or w._busy()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert w.loop is not None
    done = w.loop.create_future()  # the engine thread ran every abort submitted before this
    loop = w.loop
    w.thread.submit(lambda: loop.call_soon_threadsafe(done.set_result, None))
    await done

