"""The router's routing decision, pure: the real router and the simulator call the same object.

Per attempt of a request, `RoutingPolicy.route` says which path it takes:
  disagg ── try to reserve KV on the decode workers in `Route.decode` order (most free KV first);
            the first that says yes gets it, and `prefill_for` then picks the prefill worker
            (fewest queued prompt tokens, preferring one whose link to that decode worker is
            healthy). Every decode worker refusing means reject (503), never queue at the router:
            a full cluster says so at once and the client retries (`refused`).
  local  ── served whole by one worker: prompts shorter than `disagg_threshold`, clusters without
            a usable prefill or decode pool, and requests whose KV transfer failed too often.
            The colocated pool serves them, or else a decode worker (`decode_serves_whole`).
  reject ── no worker can take it (503, with the reason).
The policy reads only what it is given (`WorkerLoad`s: the router's view of each worker) and never
reads a clock; availability (alive, not draining, circuit closed) is folded into `available`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class WorkerLoad:
    """What the router knows of one worker (last report + what it sent since)."""

    name: str
    queued_prompt_tokens: int = 0  # prefill: prompt tokens queued or being computed
    free_blocks: int = 0  # decode: KV blocks free
    total_blocks: int = 1
    running: int = 0  # sequences running or reserved
    reserved: int = 0  # decode: reservations whose KV has not arrived (back-pressure signal)
    waiting: int = 0  # decode: sequences ready but not running (back-pressure signal)
    available: bool = True  # alive, not draining, circuit closed

    @property
    def free_fraction(self) -> float:
        return self.free_blocks / max(1, self.total_blocks)


def pick_prefill(workers: Sequence[WorkerLoad], exclude: frozenset[str] = frozenset()) -> WorkerLoad | None:
    """Least queued prompt tokens; ties to the earliest listed."""
    cands = [w for w in workers if w.available and w.name not in exclude]
    return min(cands, key=lambda w: w.queued_prompt_tokens) if cands else None


def rank_decode(workers: Sequence[WorkerLoad], exclude: frozenset[str] = frozenset()) -> list[WorkerLoad]:
    """Most free KV first, then fewest running: the order to try reservations in."""
    cands = [w for w in workers if w.available and w.name not in exclude]
    return sorted(cands, key=lambda w: (-w.free_blocks, w.running))


def pick_colocated(workers: Sequence[WorkerLoad], exclude: frozenset[str] = frozenset()) -> WorkerLoad | None:
    """Fewest requests in flight."""
    cands = [w for w in workers if w.available and w.name not in exclude]
    return min(cands, key=lambda w: w.running) if cands else None


@dataclass(frozen=True)
class Route:
    """One attempt's path: see the module docstring."""

    path: str  # "disagg" | "local" | "reject"
    decode: tuple[str, ...] = ()  # disagg: decode workers to try reserving on, in this order
    worker: str = ""  # local: the worker that serves the request whole
    reason: str = ""  # reject: what the client is told
    status: int = 503

    @staticmethod
    def reject(reason: str, status: int = 503) -> Route:
        return Route("reject", reason=reason, status=status)


@dataclass
class RoutingPolicy:
    disagg_threshold: int = 0  # prompts shorter than this skip the prefill pool
    transfer_failures_before_local: int = 2  # a request's failed KV transfers before it is served whole
    decode_serves_whole: bool = True  # no colocated pool: a decode worker serves local requests

    def route(self, prompt_tokens: int, prefill: Sequence[WorkerLoad], decode: Sequence[WorkerLoad],
              colocated: Sequence[WorkerLoad], avoid: frozenset[str] = frozenset(),
              bad_kv: frozenset[str] = frozenset()) -> Route:
        """The path of one attempt. `avoid`: workers lost or silent on this request; `bad_kv`:
        decode workers a KV transfer to failed (they may still serve the request whole)."""
        order = rank_decode(decode, avoid | bad_kv)
        local = (prompt_tokens < self.disagg_threshold or len(bad_kv) >= self.transfer_failures_before_local
                 or not order or pick_prefill(prefill, avoid) is None)
        if not local:
            return Route("disagg", decode=tuple(w.name for w in order))
        pick = pick_colocated(colocated, avoid)
        if pick is None and self.decode_serves_whole:  # no colocated worker can take it: a decode worker prefills
            pick = pick_colocated(decode, avoid)
        if pick is None:
            return Route.reject("no worker is available")
        return Route("local", worker=pick.name)

    def prefill_for(self, decode: str, prefill: Sequence[WorkerLoad], avoid: frozenset[str] = frozenset(),
                    bad_links: frozenset[str] = frozenset()) -> str | Route:
        """The prefill worker for a request reserved on `decode`: one whose link to it is not in
        `bad_links` (its breaker is open) if any, else any; a reject Route when none is available."""
        pick = pick_prefill(prefill, avoid | bad_links) or pick_prefill(prefill, avoid)
        return pick.name if pick is not None else Route.reject("no prefill worker is available")

    def refused(self) -> Route:
        """Every decode worker in the order refused the reservation: reject, do not queue."""
        return Route.reject("every decode worker is full; retry shortly")


def retry_backoff_s(attempt: int, base_s: float, max_s: float, jitter: float) -> float:
    """The wait before retry `attempt` (1: the first retry): `base_s` doubling per attempt, capped at
    `max_s`, times a factor in [0.5, 1.5) from `jitter` (a uniform draw in [0, 1)) so that requests
    failed by one fault do not all come back at the same instant."""
    return min(max_s, base_s * 2 ** (attempt - 1)) * (0.5 + jitter)
