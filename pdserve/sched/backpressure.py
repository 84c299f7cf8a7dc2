"""Decode back-pressure on the prefill batcher: the decode pool's load in, the batcher's pace out.

The router sums every decode worker's last load report into one `DecodeSignal` and sends it to
every prefill worker (with each Prefill and each heartbeat); the simulator builds the same signal
from its instances. `BackPressure.pace` turns the latest signal into what the batcher may do:

  saturated  (more sequences whose KV is in place wait on decode than it has workers, on every
             report for SETTLE_S: decode cannot run what it already has; a queue seen once is a
             prefill batch's KV that just arrived): hold, start no batch; a hold lasts at most
             `max_hold_s` from the last batch start, so prefill runs at most one smallest-budget
             batch per `max_hold_s` while decode stays behind, and a request's reservation never
             waits longer than that on it.
  behind     (some sequences wait on decode, no more than its workers, on every report for
             SETTLE_S; a queue seen for less is a batch's KV that just arrived: the full budget):
             the budget grows linearly
             with the free KV share, from `min_scale` at HOLD_FREE or below to the full budget at
             FULL_FREE: smaller batches, so KV arrives in smaller steps while decode catches up.
  keeping up (nothing waits on decode): the full budget, batches as large as prefill takes.

Low free KV alone neither holds nor shrinks: decode reserves a request's blocks before its
prefill starts (serve/router.py), so blocks held for prefill's own queue count as used, and
pacing that queue would only keep them used longer (in the simulator's seed scenario a first
version that held and shrank batches on low free KV cut 1P+1D throughput from 1,472 to 1,368
tok/s). A full
decode pool throttles the router instead: it refuses reservations and the request waits there
(`router.reserve_wait_s`).

The batch-start threshold is the full budget's: a smaller budget makes smaller batches, never
earlier ones. A signal older than STALE_S is ignored (full budget, no hold): a router gone quiet
must not stall prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.sched.routing import WorkerLoad

HOLD_FREE = 0.05  # free KV share at or below which batches are the smallest
FULL_FREE = 0.5  # free KV share from which prefill batches at its full budget
STALE_S = 2.0  # a signal older than this (the router's heartbeat is 0.1 s) is not acted on
SETTLE_S = 0.25  # a queue on decode seen this long is saturation; shorter: a batch's KV just arrived


@dataclass(frozen=True)
class DecodeSignal:
    """The decode pool summed over its available workers."""

    free_blocks: int
    total_blocks: int
    reserved: int = 0  # reservations whose KV has not arrived yet (their blocks count as not free)
    waiting: int = 0  # sequences ready on decode but not running: decode's own queue
    workers: int = 1

    @property
    def free_fraction(self) -> float:
        return self.free_blocks / max(1, self.total_blocks)

    @property
    def saturated(self) -> bool:
        return self.waiting > self.workers


def cluster_signal(decode: Sequence[WorkerLoad]) -> DecodeSignal | None:
    """The signal over the available decode workers (None: none is available)."""
    live = [w for w in decode if w.available]
    if not live:
        return None
    return DecodeSignal(sum(w.free_blocks for w in live), sum(w.total_blocks for w in live),
                        sum(w.reserved for w in live), sum(w.waiting for w in live), len(live))


@dataclass(frozen=True)
class Pace:
    """What the prefill batcher may do now."""

    scale: float  # share of max_batch_tokens one batch may hold
    hold_until: float | None = None  # start no batch before this time (None: no hold)

    def holds(self, now: float) -> bool:
        return self.hold_until is not None and now < self.hold_until


class BackPressure:
    """Turns the latest `DecodeSignal` into a `Pace`. Pure: time comes in as `now`."""

    def __init__(self, min_scale: float, max_hold_s: float) -> None:
        self.min_scale = min_scale
        self.max_hold_s = max_hold_s
        self.signal: DecodeSignal | None = None
        self.seen_at = float("-inf")
        self.queued_since: float | None = None  # every report since has shown sequences waiting on decode
        self.hold_since: float | None = None  # saturated since (or since the last batch start)

    def observe(self, signal: DecodeSignal | None, now: float) -> None:
        self.signal, self.seen_at = signal, now
        if signal is None or signal.waiting == 0:
            self.queued_since = self.hold_since = None
            return
        if self.queued_since is None:
            self.queued_since = now
        if not signal.saturated:
            self.hold_since = None
        elif self.hold_since is None and self.behind:
            self.hold_since = now

    @property
    def behind(self) -> bool:
        """Every report for SETTLE_S has shown sequences waiting on decode."""
        return self.queued_since is not None and self.seen_at - self.queued_since >= SETTLE_S

    def batch_started(self, now: float) -> None:
        """A batch started (a hold ran out, or no hold): a saturated decode holds the next one anew."""
        if self.hold_since is not None:
            self.hold_since = now

    def pace(self, now: float) -> Pace:
        s = self.signal
        if s is None or now - self.seen_at > STALE_S:
            return Pace(1.0)
        if not self.behind:
            return Pace(1.0)
        if s.saturated and self.hold_since is not None:
            return Pace(self.min_scale, self.hold_since + self.max_hold_s if self.max_hold_s > 0 else None)
        share = min(1.0, max(0.0, (s.free_fraction - HOLD_FREE) / (FULL_FREE - HOLD_FREE)))
        return Pace(self.min_scale + (1 - self.min_scale) * share)
