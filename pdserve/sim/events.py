"""The discrete-event core: a heap of (time, seq, callback, args).

Vidur's shape without its class hierarchy: an event is a callback that runs at its time and
schedules the events it causes. `seq` breaks ties in insertion order, so runs are deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class EventLoop:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.now = 0.0
        self.num_events = 0

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(t, *args)` at time `t` (never earlier than now)."""
        self._seq += 1
        heapq.heappush(self._heap, (t if t > self.now else self.now, self._seq, fn, args))

    def run(self, until: float = float("inf"), on_event: Callable[[], None] | None = None) -> None:
        heap, pop = self._heap, heapq.heappop
        n = 0
        try:
            while heap and heap[0][0] <= until:
                t, _, fn, args = pop(heap)
                self.now = t
                n += 1
                fn(t, *args)
                if on_event is not None:
                    on_event()
        finally:
            self.num_events += n

    def __len__(self) -> int:
        return len(self._heap)
