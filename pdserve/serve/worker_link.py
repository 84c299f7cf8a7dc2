"""The router's side of one worker: its connection, load and breaker, and reading its replies.

Failures surface as `Retryable` (another worker may succeed) or `BackendError` (tell the client).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pdserve.sched.breaker import CircuitBreaker
from pdserve.sched.routing import WorkerLoad
from pdserve.serve import messages as m
from pdserve.serve.backend import BackendError, TokenEvent
from pdserve.serve.rpc import RpcClient

if TYPE_CHECKING:
    from pdserve.serve.router import RouterConfig


class Retryable(BackendError):
    """This attempt failed in a way another worker may not: try again elsewhere."""

    def __init__(self, message: str, worker: str = "", transfer: bool = False) -> None:
        super().__init__(message, 503, retry_after=1)
        self.worker, self.transfer = worker, transfer


class Worker:
    """The router's view of one worker: its connection, its load, its breaker."""

    def __init__(self, role: str, address: str, secret: bytes | None, config: RouterConfig) -> None:
        self.role = role
        self.client = RpcClient(address, secret)
        self.load = WorkerLoad(name=f"{role}@{address}", available=False)
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset_s)
        self.healthy = False  # answered its last heartbeat and is not draining
        self.draining = False  # its last heartbeat said it is draining
        self.inflight = 0
        self.busy_fraction = 0.0

    @property
    def name(self) -> str:
        return self.load.name

    def refresh_available(self, now: float) -> None:
        self.load.available = self.healthy and self.breaker.allow(now)


async def watch_transfer(rid: str, pq: asyncio.Queue[m.ToRouter | None],
                          dq: asyncio.Queue[m.ToRouter | None]) -> None:
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


async def send(w: Worker, msg: m.ToWorker) -> None:
    try:
        await w.client.send(msg)
    except (OSError, ConnectionError, TimeoutError) as e:
        raise Retryable(f"cannot reach {w.name}: {e}", w.name) from e


async def get(q: asyncio.Queue[m.ToRouter | None], w: Worker, timeout: float) -> m.ToRouter | None:
    """The next message for this request; skips messages that carry no tokens (TransferDone)."""
    while True:
        try:
            msg = await asyncio.wait_for(q.get(), timeout)
        except TimeoutError:
            raise Retryable(f"{w.name} silent for {timeout:.0f}s", w.name) from None
        if not isinstance(msg, m.TransferDone):
            return msg


def event(msg: m.ToRouter | None, w: Worker) -> TokenEvent:
    if msg is None:
        raise Retryable(f"lost the connection to {w.name}", w.name)
    if not isinstance(msg, m.Tokens):
        raise Retryable(f"{w.name} sent an unexpected {type(msg).__name__}", w.name)
    if msg.error is not None:
        if msg.error_kind == "transfer":
            raise Retryable(f"{w.name}: {msg.error}", w.name, transfer=True)
        if msg.error_kind in ("overloaded", "draining"):
            raise Retryable(f"{w.name}: {msg.error}", w.name)
        raise BackendError(f"{w.name}: {msg.error}", 400 if msg.error_kind == "invalid" else 500)
    return TokenEvent(list(msg.token_ids), msg.finish_reason, timings=dict(msg.timings),
                      num_cached_tokens=msg.num_cached_tokens)


async def with_deadline(stream: AsyncIterator[TokenEvent], deadline: float) -> AsyncIterator[TokenEvent]:
    """Ends the request with an error once its overall deadline has passed. Waits between events
    are bounded by the first-token and token timeouts, so checking between events suffices."""
    async for ev in stream:
        if time.monotonic() > deadline:
            raise BackendError("request deadline exceeded", 504)
        yield ev
