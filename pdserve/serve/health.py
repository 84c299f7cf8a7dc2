"""The router's /health: can the cluster serve a request now, and if not, why.

A request is served either disaggregated (a prefill and a decode worker) or whole, by a
colocated worker, or by a decode worker when the cluster has no colocated workers (the router's
`_local` path). The cluster can serve while either way has an available worker for each role it
needs; availability is the heartbeat's (answered its last stats query and is not draining). A
worker switching roles counts in its old role's total until it serves in its new one. A worker's
name (`role@host:port`, the role it joined as) is its stable id; `role` is what it serves now, and
`joined_as` is shown where the two differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

ROLES = ("prefill", "decode", "colocated")


class WorkerView(Protocol):
    """What /health reads of the router's view of one worker."""

    role: str  # the role it serves now
    joined_as: str  # the role in its name (names are stable ids; a switch does not rename)
    healthy: bool
    draining: bool
    switching: str

    @property
    def name(self) -> str: ...


def _state(w: WorkerView) -> str:
    if w.healthy:
        return "up"
    if w.switching:
        return "switching"
    return "draining" if w.draining else "down"


def cluster_health(workers: Sequence[WorkerView]) -> tuple[bool, dict[str, Any]]:
    """(can serve, JSON body): 'ok', 'degraded' (serving, but a configured role has no worker up)
    or 'unavailable' with the reason."""
    total = {r: sum(w.role == r for w in workers) for r in ROLES}
    up = {r: sum(w.role == r and w.healthy for w in workers) for r in ROLES}
    whole_role = "colocated" if total["colocated"] else "decode"
    disagg = up["prefill"] > 0 and up["decode"] > 0
    whole = up[whole_role] > 0
    body: dict[str, Any] = {
        "status": "ok",
        "roles": {r: {"available": up[r], "total": total[r]} for r in ROLES if total[r]},
        "workers": [{"name": w.name, "role": w.role, "state": _state(w),
                     **({"joined_as": w.joined_as} if w.joined_as != w.role else {}),
                     **({"switching_to": w.switching} if w.switching else {})} for w in workers],
    }
    missing = [r for r in ROLES if total[r] and not up[r]]
    if disagg or whole:
        if missing:
            body["status"] = "degraded"
            body["reason"] = f"no {' or '.join(missing)} worker is available"
        return True, body
    body["status"] = "unavailable"
    if whole_role == "decode":
        body["reason"] = "no decode worker is available (and no colocated worker to fall back on)"
    else:
        lacking = [r for r in ("prefill", "decode") if not up[r]]
        body["reason"] = (f"no colocated worker is available, and no {' or '.join(lacking)} worker "
                          "for disaggregated serving")
    return False, body
