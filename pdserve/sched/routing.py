"""The router's pair selection, pure: the real router and the simulator pick workers the same way."""

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
