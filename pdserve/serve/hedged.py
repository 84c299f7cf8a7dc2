"""Hedged prefill: race a duplicate attempt against a slow first token (the router's `generate`).

`HedgePolicy` (sched/hedge.py, pure) decides when a first token is late and whether the hedge
budget allows a duplicate; this module runs the race over two attempt streams and counts it on
the owner (the router: `hedges` sent, `hedge_wins` won by the duplicate).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import suppress
from typing import Protocol

from pdserve.sched.hedge import HedgePolicy
from pdserve.serve.backend import BackendError, TokenEvent

# (request id, workers to avoid, list the attempt appends its prefill worker to) -> the attempt's stream
MakeAttempt = Callable[[str, frozenset[str], list[str]], AsyncGenerator[TokenEvent, None]]


class HedgeOwner(Protocol):
    """What the race reads and counts: the policy and the two counters."""

    hedge: HedgePolicy
    hedges: int
    hedge_wins: int


async def hedged(owner: HedgeOwner, rid: str, make: MakeAttempt, avoid: frozenset[str]
                 ) -> AsyncGenerator[TokenEvent, None]:
    """One attempt, and a duplicate on another worker if its first token is late (`HedgePolicy`):
    the first to stream its first token is the one the client hears from; the other is
    cancelled (its Calls close: the workers are told to drop it, blocks and reservation freed)."""
    chosen: list[str] = []
    t0 = time.monotonic()
    a = make(rid, avoid, chosen)
    fa: asyncio.Future[TokenEvent] = asyncio.ensure_future(anext(a))
    b: AsyncGenerator[TokenEvent, None] | None = None
    fb: asyncio.Future[TokenEvent] | None = None
    try:
        delay = owner.hedge.delay()
        done, _ = await asyncio.wait({fa}, timeout=delay if delay != float("inf") else None)
        if not done and owner.hedge.try_hedge(time.monotonic() - t0):
            try:
                b = make(f"{rid}~h", avoid | frozenset(chosen), [])
            except BackendError:
                b = None  # no other worker can take it: keep waiting on the first
            else:
                fb = asyncio.ensure_future(anext(b))
                owner.hedges += 1
        winner, ev = a, None
        if fb is None or b is None:
            ev = await fa
            owner.hedge.observe(time.monotonic() - t0)
        else:
            first, _ = await asyncio.wait({fa, fb}, return_when=asyncio.FIRST_COMPLETED)
            lead = fa if fa in first else fb
            other = fb if lead is fa else fa
            if lead.exception() is not None:  # the first to answer failed: the other may still succeed
                await asyncio.wait({other})
                if other.exception() is not None:
                    raise fa.exception()  # type: ignore[misc]  # the primary's failure drives the retry
                lead, other = other, lead
            winner = a if lead is fa else b
            loser = b if lead is fa else a
            if winner is b:
                owner.hedge_wins += 1
            other.cancel()
            with suppress(BaseException):
                await other
            await loser.aclose()
            ev = lead.result()
            ev.timings = {**ev.timings, "hedged": 1.0, "hedge_won": float(winner is b)}
        yield ev
        async for ev in winner:
            yield ev
    finally:
        for f, g in ((fa, a), (fb, b)):
            if f is not None and not f.done():
                f.cancel()
                with suppress(BaseException):
                    await f
            if g is not None:
                await g.aclose()
