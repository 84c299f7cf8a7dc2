"""Circuit breakers (pure; time is an argument): stop sending work where it keeps failing.

closed ──(failure_threshold failures in a row)──▶ open ──(reset_timeout_s)──▶ half-open
half-open lets one probe through: success closes the circuit, failure opens it again.

Every request sent through a breaker is a `Dispatch` that ends in exactly one `Outcome`:
SUCCESS (the worker did its part), FAILURE (the worker or link is at fault), or NEUTRAL (the
request ended for a reason that says nothing about the worker: a client that left, a bad request,
a refusal because the worker is full or draining). Only the first outcome of a dispatch counts.
A probe whose outcome has not come within `probe_timeout_s` no longer holds the half-open slot, so
a probe that is lost, or is simply a long generation, cannot keep a healthy worker out for good.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BreakerState(enum.Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


@dataclass(eq=False)
class Dispatch:
    """One request sent through a breaker; `end` it exactly once (later calls are ignored)."""

    breaker: CircuitBreaker
    started: float
    probe: bool  # sent in half-open: its outcome decides the circuit
    outcome: Outcome | None = None

    def end(self, outcome: Outcome, now: float) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.breaker._ended(self, outcome, now)


@dataclass
class CircuitBreaker:
    failure_threshold: int = 3
    reset_timeout_s: float = 5.0
    probe_timeout_s: float = 30.0
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probe: Dispatch | None = None  # the probe in flight in half-open

    def allow(self, now: float) -> bool:
        """May a request go through now? In half-open, only one probe at a time."""
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.reset_timeout_s:
            self.state, self.probe = BreakerState.HALF_OPEN, None
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.HALF_OPEN:
            return self.probe is None or now - self.probe.started >= self.probe_timeout_s
        return False

    def dispatch(self, now: float) -> Dispatch:
        """A request goes through now (in half-open, it is the probe)."""
        d = Dispatch(self, now, probe=self.state is BreakerState.HALF_OPEN)
        if d.probe:
            self.probe = d
        return d

    def _ended(self, d: Dispatch, outcome: Outcome, now: float) -> None:
        if d is self.probe:
            self.probe = None
        if outcome is Outcome.SUCCESS:
            if self.state is BreakerState.CLOSED or (self.state is BreakerState.HALF_OPEN and d.probe):
                self.state, self.failures = BreakerState.CLOSED, 0
            # OPEN: a request that started before the circuit opened proves nothing new; the
            # reset timer and a probe decide.
        elif outcome is Outcome.FAILURE:
            if self.state is BreakerState.OPEN:
                return
            self.failures += 1
            if self.state is BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
                self.state, self.opened_at, self.probe = BreakerState.OPEN, now, None
