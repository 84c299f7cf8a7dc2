"""When the router sends a duplicate ("hedged") prefill, pure: the time is an argument.

A request whose first token has not come `delay()` seconds after it was sent gets one duplicate
attempt on another worker; whichever streams its first token first wins and the other is
cancelled (see serve/router.py). The delay is `after_s`, or the `percentile` of recent first-token
times when that is later (a fixed delay alone hedges everything once the whole cluster is slow). At
most `max_fraction` of the last `window` requests are hedged, so under overload, when every
request is late, hedging adds at most that fraction of load instead of doubling it.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field


@dataclass
class HedgePolicy:
    after_s: float = 0.0  # 0: hedging off
    percentile: float = 0.0  # 0: the fixed delay alone; e.g. 95: at least the p95 of recent first tokens
    max_fraction: float = 0.05  # of the last `window` requests
    window: int = 200
    min_samples: int = 10  # percentile mode: first-token times seen before any hedge
    _samples: deque[float] = field(default_factory=deque, repr=False)
    _sorted: list[float] = field(default_factory=list, repr=False)
    _hedged: deque[bool] = field(default_factory=deque, repr=False)  # per recent request: hedged?
    _num_hedged: int = 0

    @property
    def enabled(self) -> bool:
        return self.after_s > 0 and self.max_fraction > 0

    def observe(self, first_token_s: float) -> None:
        """An unhedged attempt's time from send to first token (hedged ones would bias it low)."""
        self._samples.append(first_token_s)
        bisect.insort(self._sorted, first_token_s)
        if len(self._samples) > self.window:
            old = self._samples.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    def delay(self) -> float:
        """Seconds to wait for a first token before hedging. Percentile mode hedges nothing until
        it has seen `min_samples` first tokens: before that it cannot tell slow from normal."""
        d = self.after_s
        if self.percentile > 0:
            if len(self._sorted) < self.min_samples:
                return float("inf")
            k = min(len(self._sorted) - 1, int(self.percentile / 100 * len(self._sorted)))
            d = max(d, self._sorted[k])
        return d

    def arrived(self) -> None:
        """A new request (its first attempt) entered the router."""
        self._hedged.append(False)
        if len(self._hedged) > self.window:
            self._num_hedged -= self._hedged.popleft()

    def try_hedge(self, waited_s: float) -> bool:
        """The request has waited `waited_s` for its first token: hedge it now? (Counts it if so.)"""
        if not self.enabled or waited_s < self.delay() or not self._hedged:
            return False
        if self._num_hedged + 1 > self.max_fraction * len(self._hedged):
            return False
        self._num_hedged += 1
        # mark the newest unhedged request: the count is per window, not per request identity
        for i in range(len(self._hedged) - 1, -1, -1):
            if not self._hedged[i]:
                self._hedged[i] = True
                break
        return True

    @property
    def hedged_fraction(self) -> float:
        return self._num_hedged / max(1, len(self._hedged))
