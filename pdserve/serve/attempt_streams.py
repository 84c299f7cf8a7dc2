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
    """Ends the request with an error once its overall deadline (time.monotonic()) has passed,
    mid-wait too: a prefill that keeps reporting progress is not silent, so no other timeout ends
    that wait. The attempt is cancelled then, which closes its Calls (the workers drop it)."""
    loop = asyncio.get_running_loop()
    async with aclosing(stream):
        while True:
            try:
                async with asyncio.timeout_at(loop.time() + deadline - time.monotonic()) as limit:
                    ev = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if limit.expired():
                    raise BackendError("request deadline exceeded", 504) from None
                raise
            if time.monotonic() > deadline:
                raise BackendError("request deadline exceeded", 504)
            yield ev
