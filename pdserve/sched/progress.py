"""When a prefill worker says that a request it holds is still on its way to the first token.

A decode worker frees a reservation whose KV has not come `reservation_timeout_s` after it was
made or last renewed, and the router gives up on a prefill silent for `first_token_timeout_s`.
Neither can tell a long prompt (many chunks) or a long prefill queue from a dead worker. So a
prefill worker that is stepping says, for each request it holds whose first token is not out yet,
"still here" at most every `every_s` (a quarter of the shorter timeout: a renewal or two may be
late or lost and the reservation still holds). A worker that died, is stopped or hangs says
nothing, and both timeouts run out as before.
"""

from __future__ import annotations


def progress_interval(reservation_timeout_s: float, first_token_timeout_s: float) -> float:
    """How often a held request's progress is reported: well inside both timeouts."""
    return min(reservation_timeout_s, first_token_timeout_s) / 4


class ProgressPacer:
    """Which held requests are due a progress report (pure: the time is an argument)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}  # request id -> when it arrived or was last reported

    def arrived(self, request_id: str, now: float) -> None:
        """The request came (the router's own timeouts start about now)."""
        self._last[request_id] = now

    def forget(self, request_id: str) -> None:
        """Its first token went out (or it ended): nothing more to report."""
        self._last.pop(request_id, None)

    def due(self, now: float) -> list[str]:
        """The requests to report now, after a step; each is then not due again for `every_s`."""
        due = [rid for rid, last in self._last.items() if now - last >= self.every_s]
        for rid in due:
            self._last[rid] = now
        return due

    def __len__(self) -> int:
        return len(self._last)
