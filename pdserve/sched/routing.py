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

Placement is load-aware in every pool: a worker's load is the prompt tokens the router sent it that
are not yet computed, plus a weight per sequence it generates, from the router's own live counts
(reports are a heartbeat old and miss what was sent since); equal loads take turns. Counting
requests and breaking ties to the first listed worker left two identical colocated workers at
50% and 23% busy under Poisson traffic. prefix_aware routing subtracts the prompt tokens a worker
already caches (from its block-hash events, `prefix_index.py`) from what it would compute.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

ROUTINGS = ("least_loaded", "prefix_aware")


@dataclass
class WorkerLoad:
    """What the router knows of one worker: its last report, and the router's own live counts.

    The router dispatches every request its workers run, so its own counts (`pending_tokens`,
    `decoding`) are exact at the moment of the decision, while a report is up to a heartbeat old
    and misses what was sent since: placement reads the router's counts."""

    name: str
    queued_prompt_tokens: int = 0  # reported: prompt tokens queued or being computed
    free_blocks: int = 0  # reported (less the router's reservations since): KV blocks free
    total_blocks: int = 1
    running: int = 0  # reported: sequences running or reserved
    reserved: int = 0  # decode: reservations whose KV has not arrived (back-pressure signal)
    waiting: int = 0  # decode: sequences ready but not running (back-pressure signal)
    available: bool = True  # alive, not draining, circuit closed
    pending_tokens: int = 0  # router's own: prompt tokens sent here to compute, first token not back yet
    decoding: int = 0  # router's own: requests past their first token, still generating here

    @property
    def free_fraction(self) -> float:
        return self.free_blocks / max(1, self.total_blocks)


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
    """Which path and which workers an attempt takes (see the module docstring)."""

    disagg_threshold: int = 0  # prompts shorter than this skip the prefill pool
    transfer_failures_before_local: int = 2  # a request's failed KV transfers before it is served whole
    decode_serves_whole: bool = True  # no colocated pool: a decode worker serves local requests
    routing: str = "least_loaded"  # or "prefix_aware": cached prefix blocks count against queued work
    decode_token_weight: int = 16  # a generating sequence's load, in prompt tokens still to compute
    # per pool: rotates ties, so equally loaded workers share the work (one counter per pool, or
    # the decode ranking and the prefill pick of one request would step a shared one in lockstep)
    _turns: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")

    # ---- scores ------------------------------------------------------------------------------
    def load(self, w: WorkerLoad) -> int:
        """Work ahead of a new request on `w`, in prompt tokens: what it still has to prefill plus
        a weight per sequence it is generating (they share every step with the prefill)."""
        return w.pending_tokens + self.decode_token_weight * w.decoding

    def cost(self, w: WorkerLoad, prompt_tokens: int, hits: Mapping[str, int] | None) -> int:
        """Load plus the prompt tokens `w` would compute. prefix_aware: tokens of the prompt's
        prefix that `w` already caches (`hits`) are not computed. This is also the guard against
        piling onto one worker: a cached prefix buys at most its own length of extra queue, so a
        worker is passed over once its queue exceeds the others' by more than what it saves, per
        request, never by switching prefix routing off for the whole fleet."""
        hit = hits.get(w.name, 0) if hits is not None and self.routing == "prefix_aware" else 0
        return self.load(w) + max(0, prompt_tokens - hit)

    def _least(self, cands: list[WorkerLoad], key: Callable[[WorkerLoad], object], pool: str) -> WorkerLoad | None:
        """The candidate with the smallest key; ties go round in turn (always taking the first
        listed loads the first worker whenever the pool is idle)."""
        if not cands:
            return None
        best = min(key(w) for w in cands)
        tied = [w for w in cands if key(w) == best]
        turn = self._turns[pool] = self._turns.get(pool, 0) + 1
        return tied[turn % len(tied)]

    def pick_prefill(self, workers: Sequence[WorkerLoad], exclude: frozenset[str] = frozenset(),
                     prompt_tokens: int = 0, hits: Mapping[str, int] | None = None) -> WorkerLoad | None:
        """Least cost (queued prompt tokens + this prompt's uncached tokens)."""
        cands = [w for w in workers if w.available and w.name not in exclude]
        return self._least(cands, lambda w: self.cost(w, prompt_tokens, hits), "prefill")

    def pick_colocated(self, workers: Sequence[WorkerLoad], exclude: frozenset[str] = frozenset(),
                       prompt_tokens: int = 0, hits: Mapping[str, int] | None = None) -> WorkerLoad | None:
        """Least cost: prompt tokens still to compute, generating sequences weighted, this prompt."""
        cands = [w for w in workers if w.available and w.name not in exclude]
        return self._least(cands, lambda w: self.cost(w, prompt_tokens, hits), "whole")

    def rank_decode(self, workers: Sequence[WorkerLoad], exclude: frozenset[str] = frozenset()) -> list[WorkerLoad]:
        """Most free KV first, then fewest sequences (reported or the router's own); the order to
        try reservations in. Equal leaders take turns at the front."""
        cands = sorted((w for w in workers if w.available and w.name not in exclude),
                       key=lambda w: (-w.free_blocks, max(w.running, w.decoding)))
        if len(cands) > 1:
            first = self._least(cands, lambda w: (-w.free_blocks, max(w.running, w.decoding)), "decode")
            cands.remove(first)  # type: ignore[arg-type]
            cands.insert(0, first)  # type: ignore[arg-type]
        return cands

    # ---- decisions ---------------------------------------------------------------------------
    def route(self, prompt_tokens: int, prefill: Sequence[WorkerLoad], decode: Sequence[WorkerLoad],
              colocated: Sequence[WorkerLoad], avoid: frozenset[str] = frozenset(),
              bad_kv: frozenset[str] = frozenset(), hits: Mapping[str, int] | None = None) -> Route:
        """The path of one attempt. `avoid`: workers lost or silent on this request; `bad_kv`:
        decode workers a KV transfer to failed (they may still serve the request whole); `hits`:
        per worker, the prompt tokens its prefix cache holds (prefix_aware routing)."""
        local = (prompt_tokens < self.disagg_threshold or len(bad_kv) >= self.transfer_failures_before_local
                 or not any(w.available and w.name not in avoid | bad_kv for w in decode)
                 or not any(w.available and w.name not in avoid for w in prefill))
        if not local:
            return Route("disagg", decode=tuple(w.name for w in self.rank_decode(decode, avoid | bad_kv)))
        pick = self.pick_colocated(colocated, avoid, prompt_tokens, hits)
        if pick is None and self.decode_serves_whole:  # no colocated worker can take it: a decode worker prefills
            pick = self.pick_colocated(decode, avoid, prompt_tokens, hits)
        if pick is None:
            return Route.reject("no worker is available")
        return Route("local", worker=pick.name)

    def prefill_for(self, decode: str, prefill: Sequence[WorkerLoad], avoid: frozenset[str] = frozenset(),
                    bad_links: frozenset[str] = frozenset(), prompt_tokens: int = 0,
                    hits: Mapping[str, int] | None = None) -> str | Route:
        """The prefill worker for a request reserved on `decode`: the least cost one whose link to
        it is not in `bad_links` (its breaker is open) if any, else any; a reject Route when none
        is available."""
        pick = (self.pick_prefill(prefill, avoid | bad_links, prompt_tokens, hits)
                or self.pick_prefill(prefill, avoid, prompt_tokens, hits))
        return pick.name if pick is not None else Route.reject("no prefill worker is available")

    def refused(self) -> Route:
        """Every decode worker in the order refused the reservation: reject, do not queue."""
        return Route.reject("every decode worker is full; retry shortly")


def retry_backoff_s(attempt: int, base_s: float, max_s: float, jitter: float) -> float:
    """The wait before retry `attempt` (1: the first retry): `base_s` doubling per attempt, capped at
    `max_s`, times a factor in [0.5, 1.5) from `jitter` (a uniform draw in [0, 1)) so that requests
    failed by one fault do not all come back at the same instant."""
    return min(max_s, base_s * 2 ** (attempt - 1)) * (0.5 + jitter)
