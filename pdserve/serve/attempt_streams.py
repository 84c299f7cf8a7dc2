"""Wrappers around one attempt's token stream: the request's overall deadline, and the KV transfer
watch that fails a disaggregated attempt as soon as its prefill side reports the push failed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from pdserve.serve import messages as m
from pdserve.serve.backend import BackendError, TokenEvent


async def watch_transfer(pq: asyncio.Queue[m.ToRouter | None], dq: asyncio.Queue[m.ToRouter | None],
                         rid: str) -> None:
    """After the first token: if the prefill side reports the KV push failed (or its connection
    drops before confirming it), fail this attempt at once rather than when the decode worker's
    wait for the missing KV times out."""
    while True:
        msg = await pq.get()
        if isinstance(msg, m.TransferDone) and msg.ok:
            return
        if msg is None or isinstance(msg, m.TransferDone):
            why = msg.error if msg is not None else "prefill worker lost before the KV was confirmed"
            dq.put_nowait(m.Tokens(rid, [], error=f"KV transfer failed: {why}", error_kind="transfer"))
            return


async def with_deadline(stream: AsyncGenerator[TokenEvent, None], deadline: float) -> AsyncIterator[TokenEvent]:
    """Ends the request with an error once its overall deadline has passed. Waits between events
    are bounded by the first-token and token timeouts, so checking between events suffices."""
    async with aclosing(stream):
        async for ev in stream:
            if time.monotonic() > deadline:
                raise BackendError("request deadline exceeded", 504)
            yield ev
