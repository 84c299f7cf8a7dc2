"""Circuit breakers (pure; time is an argument): stop sending work where it keeps failing.

closed ──(failure_threshold failures in a row)──▶ open ──(reset_timeout_s)──▶ half-open
half-open lets one probe through: success closes the circuit, failure opens it again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BreakerState(enum.Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass
class CircuitBreaker:
    failure_threshold: int = 3
    reset_timeout_s: float = 5.0
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False

    def allow(self, now: float) -> bool:
        """May a request go through now? In half-open, only one probe at a time."""
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.reset_timeout_s:
            self.state, self.probing = BreakerState.HALF_OPEN, False
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.HALF_OPEN and not self.probing:
            return True
        return False

    def on_dispatch(self) -> None:
        """A request was sent through (in half-open, that request is the probe)."""
        if self.state is BreakerState.HALF_OPEN:
            self.probing = True

    def record_success(self, now: float) -> None:
        self.state, self.failures, self.probing = BreakerState.CLOSED, 0, False

    def record_failure(self, now: float) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            self.state, self.opened_at, self.probing = BreakerState.OPEN, now, False
