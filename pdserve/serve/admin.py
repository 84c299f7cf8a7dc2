"""The router's pool administration: workers join, leave, and switch roles at runtime.

`PoolAdmin` is the part of `ClusterBackend` (router.py) that changes which workers are in which
pool; `admin_http.add_admin_routes` puts the role switch on the router's HTTP API. A worker's role is what it reports in its heartbeat
(`Worker.role`), so a switch moves it between pools without the router restarting anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdserve.serve.health import ROLES

if TYPE_CHECKING:  # the CLI imports this module for its constants: nothing heavy at import time
    from pdserve.config.schema import RouterConfig
    from pdserve.sched.prefix_index import PrefixIndex
    from pdserve.serve.worker_link import Worker
SWITCH_GRACE_S = 30.0  # how long a switching worker lets what it holds finish before handing it back


class PoolAdmin:
    """Join, leave, switch role; mixed into ClusterBackend, whose fields these are."""

    workers: list[Worker]
    secret: bytes | None
    config: RouterConfig
    index: PrefixIndex | None

    async def add_worker(self, role: str, address: str) -> str:
        """A worker started after the router joins the pool (it needs the cluster secret). One
        already known at that address keeps its entry (its heartbeat says its role)."""
        if role not in ROLES:
            raise ValueError("role must be prefill, decode or colocated")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("address must be host:port")
        existing = next((w for w in self.workers if w.client.address == address), None)
        if existing is None:
            from pdserve.serve.worker_link import Worker

            existing = Worker(role, address, self.secret, self.config, self.index)
            self.workers.append(existing)
        await existing.heartbeat()
        return existing.name

    async def remove_worker(self, address: str) -> bool:
        """A worker stopped (or moved) leaves the pool; its requests still in flight fail over.
        False if no worker has that address."""
        gone = [w for w in self.workers if w.client.address == address]
        self.workers = [w for w in self.workers if w.client.address != address]
        for w in gone:
            await w.client.close()
        return bool(gone)

    async def switch_role(self, name: str, role: str, *, grace_s: float = SWITCH_GRACE_S,
                          timeout_s: float | None = None) -> None:
        """Switch worker `name` (`Worker.name`) to `role`, keeping its weights and KV memory; returns
        once the router sees it serving in the new role. Requests it holds finish there (for up to
        `grace_s`) or are handed back and retried elsewhere, losslessly. A no-op if it has that role.

        Raises ValueError (unknown worker or role), TimeoutError (no answer within `timeout_s`,
        default: grace plus the request timeout), RuntimeError (it could not switch, or is not
        back up in the new role), ConnectionError (it is unreachable)."""
        w = next((w for w in self.workers if w.name == name), None)
        if w is None:
            raise ValueError(f"no worker named {name!r} (have: {', '.join(x.name for x in self.workers)})")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if w.role == role and not w.switching:
            return
        timeout = timeout_s if timeout_s is not None else grace_s + self.config.request_timeout_s
        await w.switch_role(role, grace_s, timeout)
        if w.role != role or not w.healthy:
            raise RuntimeError(f"{name} switched but does not serve as {role} (reports {w.role}, "
                               f"{'up' if w.healthy else 'not up'})")
