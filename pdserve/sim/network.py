"""KV transfers over shared links, as processor sharing.

Every instance has a port (its NICs: one per GPU, so `tp` x the link's bandwidth). A transfer runs
from a prefill port to a decode port at min(src share, dst share), where a port's share is its
bandwidth divided by its active transfers. Whenever a transfer starts or ends, the transfers on
the two ports are advanced to `now` and re-rated, and their completion events re-issued (older
events are recognised as stale by a version number). The base latency is paid once, at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.sim.events import EventLoop


@dataclass(eq=False)
class Port:
    name: str
    bandwidth: float  # effective bytes/s, per direction
    active: set[Transfer] = field(default_factory=set)
    bytes_moved: float = 0.0
    busy_time: float = 0.0  # time with at least one transfer in flight
    max_concurrent: int = 0
    _busy_since: float | None = None

    def share(self) -> float:
        return self.bandwidth / max(1, len(self.active))

    def join(self, t: Transfer, now: float) -> None:
        if not self.active:
            self._busy_since = now
        self.active.add(t)
        self.max_concurrent = max(self.max_concurrent, len(self.active))

    def leave(self, t: Transfer, now: float) -> None:
        self.active.discard(t)
        if not self.active and self._busy_since is not None:
            self.busy_time += now - self._busy_since
            self._busy_since = None

    def utilization(self, duration: float) -> dict[str, float]:
        busy = self.busy_time + ((duration - self._busy_since) if self._busy_since is not None else 0.0)
        return {
            "bytes": self.bytes_moved,
            "busy_frac": busy / duration if duration > 0 else 0.0,
            "bandwidth_util": self.bytes_moved / (self.bandwidth * duration) if duration > 0 else 0.0,
            "max_concurrent": self.max_concurrent,
        }


@dataclass(eq=False)
class Transfer:
    src: Port
    dst: Port
    remaining: float  # bytes
    latency: float
    on_done: Callable[[float], None]
    rate: float = 0.0
    updated: float = 0.0
    version: int = 0


class Network:
    """Starts transfers and fires `on_done(now)` when each one's last byte (plus latency) lands."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.num_transfers = 0

    def start(self, src: Port, dst: Port, num_bytes: float, latency: float,
              on_done: Callable[[float], None], now: float) -> None:
        self.num_transfers += 1
        if num_bytes <= 0:
            self.loop.at(now + latency, on_done)
            return
        t = Transfer(src, dst, float(num_bytes), latency, on_done, updated=now)
        affected = src.active | dst.active
        self._advance(affected, now)
        src.join(t, now)
        dst.join(t, now)
        self._rerate(affected | {t}, now)

    def _advance(self, transfers: set[Transfer], now: float) -> None:
        for t in transfers:
            moved = t.rate * (now - t.updated)
            t.remaining = max(0.0, t.remaining - moved)
            t.src.bytes_moved += moved
            t.dst.bytes_moved += moved
            t.updated = now

    def _rerate(self, transfers: set[Transfer], now: float) -> None:
        for t in transfers:
            t.rate = min(t.src.share(), t.dst.share())
            t.version += 1
            self.loop.at(now + t.remaining / t.rate, self._finish, t, t.version)

    def _finish(self, now: float, t: Transfer, version: int) -> None:
        if version != t.version:
            return  # re-rated since this event was issued
        self._advance({t}, now)
        t.src.leave(t, now)
        t.dst.leave(t, now)
        self._advance(t.src.active | t.dst.active, now)
        self._rerate(t.src.active | t.dst.active, now)
        self.loop.at(now + t.latency, t.on_done)
