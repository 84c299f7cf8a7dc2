"""The router's side of one worker: its connection, heartbeat, load and circuit breaker.

`Worker.call(rid)` opens one request's exchange with that worker (`Call`): the request id is named
once, there. A Call sends, reads the worker's replies as token events, and when it closes it ends
its breaker dispatch with exactly one outcome and, unless the worker is done with the request,
tells the worker to drop it. Failures surface as `Retryable` (another worker may succeed) or
`BackendError` (tell the client).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pdserve.engine.sampler import TokenLogprobs
from pdserve.sched.backpressure import DecodeSignal
from pdserve.sched.breaker import CircuitBreaker, Dispatch, Outcome
from pdserve.sched.prefix_index import PrefixIndex
from pdserve.sched.routing import WorkerLoad
from pdserve.serve import messages as m
from pdserve.serve.backend import BackendError, TokenEvent
from pdserve.serve.rpc import RpcClient

if TYPE_CHECKING:
    from pdserve.config.schema import RouterConfig

log = logging.getLogger("pdserve.router")


class Retryable(BackendError):
    """This attempt failed in a way another worker may not: try again elsewhere.

    fault=False: the worker refused (full, draining), which is overload, not a fault."""

    def __init__(self, message: str, worker: str = "", transfer: bool = False, fault: bool = True) -> None:
        super().__init__(message, 503, retry_after=1)
        self.worker, self.transfer, self.fault = worker, transfer, fault


class WorkerFailed(BackendError):
    """The worker failed this request itself (an internal error): the client gets a 500."""

    def __init__(self, message: str, worker: str) -> None:
        super().__init__(message, 500)
        self.worker = worker


def breaker(config: RouterConfig) -> CircuitBreaker:
    return CircuitBreaker(config.breaker_failures, config.breaker_reset_s, config.breaker_probe_timeout_s)


@contextmanager
def ending(d: Dispatch, answered: Callable[[], bool], blame: Callable[[BaseException], bool]) -> Iterator[None]:
    """End `d` when the block exits, however it exits (error, cancellation, a consumer that stops
    reading): FAILURE if `blame` holds the exception against it, else SUCCESS if the other side
    `answered`, else NEUTRAL."""
    try:
        yield
    except BaseException as e:
        d.end(Outcome.FAILURE if blame(e) else Outcome.SUCCESS if answered() else Outcome.NEUTRAL,
              time.monotonic())
        raise
    d.end(Outcome.SUCCESS if answered() else Outcome.NEUTRAL, time.monotonic())


class Worker:
    """The router's view of one worker: its connection, its load, its breaker."""

    def __init__(self, role: str, address: str, secret: bytes | None, config: RouterConfig,
                 index: PrefixIndex | None = None) -> None:
        """`index`: the router's prefix index, fed this worker's block-hash events (None: not asked for)."""
        self.role = role  # the role it serves now (a switch changes it)
        self.joined_as = role  # the role it joined as, in its name: the name is its id and never changes
        self.index = index
        self.block_size = 0  # its KV block size and prefix-cache salt, as last reported
        self.cache_salt = b""
        self.client = RpcClient(address, secret)
        self.load = WorkerLoad(name=f"{role}@{address}", available=False)
        self.breaker = breaker(config)
        self.healthy = False  # answered its last heartbeat and is not draining
        self.draining = False  # its last heartbeat said it is draining
        self.switching = ""  # the role it is switching to (out of every pool meanwhile), else empty
        self.inflight = 0
        self.busy_fraction = 0.0
        self.stats: m.Stats | None = None  # its last heartbeat's answer (queues, metrics for /metrics)
        self._nonce = 0
        self._cleanup: set[asyncio.Future[None]] = set()  # abort sends in flight

    @property
    def name(self) -> str:
        return self.load.name

    def refresh_available(self, now: float) -> WorkerLoad:
        self.load.available = self.healthy and self.breaker.allow(now)
        return self.load

    async def heartbeat(self, decode: DecodeSignal | None = None) -> None:
        """Ask the worker for its load (telling a prefill worker the decode pool's, `decode`);
        an unreachable or silent one leaves the pool."""
        self._nonce += 1
        nonce = f"stats-{self._nonce}"
        q = self.client.open(nonce)
        try:
            await self.client.send(m.StatsQuery(nonce, decode, kv_events=self.index is not None))
            s = await asyncio.wait_for(q.get(), timeout=2.0)
            if not isinstance(s, m.Stats):
                raise ConnectionError("connection lost")
            self.load.queued_prompt_tokens = s.queued_prompt_tokens
            self.load.free_blocks, self.load.total_blocks = s.free_blocks, s.total_blocks
            self.load.running = s.running + s.reserved + s.waiting
            self.load.reserved, self.load.waiting = s.reserved, s.waiting
            self.busy_fraction = s.busy_fraction
            self.block_size, self.cache_salt = s.block_size, s.cache_salt
            if self.index is not None:
                self.index.apply(self.name, s.kv_stored, s.kv_evicted, s.kv_cleared)
            self.stats = s
            if s.role and s.role != self.role:  # a switch: its pool is the role it runs now
                log.info("%s now serves as %s (was %s)", self.name, s.role, self.role)
                self.role = s.role
            if not self.healthy and not s.draining:
                log.info("%s joined the %s pool", self.name, self.role)
            self.healthy, self.draining, self.switching = not s.draining, s.draining, s.switching
        except (TimeoutError, OSError, ConnectionError) as e:
            if self.healthy:
                log.warning("%s left the pool: %s", self.name, e or type(e).__name__)
                if self.index is not None:
                    self.index.forget(self.name)  # it may come back with an empty cache
            self.healthy = self.draining = False
        finally:
            self.client.close_queue(nonce)

    async def switch_role(self, role: str, grace_s: float, timeout_s: float) -> None:
        """Ask the worker to become `role` and wait for its answer; it is out of every pool from
        now until a heartbeat shows it serving again (in its new role)."""
        self._nonce += 1
        nonce = f"switch-{self._nonce}"
        self.healthy, self.switching = False, role  # no new work from this moment, not a heartbeat later
        q = self.client.open(nonce)
        try:
            try:
                await self.client.send(m.SwitchRole(nonce, role, grace_s))
                reply = await asyncio.wait_for(q.get(), timeout_s)
            except TimeoutError:
                raise TimeoutError(f"{self.name} did not switch to {role} within {timeout_s:.0f}s") from None
            except (OSError, ConnectionError) as e:
                raise ConnectionError(f"cannot reach {self.name}: {e}") from e
            if not isinstance(reply, m.RoleSwitched):
                raise ConnectionError(f"lost the connection to {self.name} while it switched to {role}")
            if reply.error:
                raise RuntimeError(f"{self.name} could not switch to {role}: {reply.error}")
        finally:
            self.client.close_queue(nonce)
            await self.heartbeat()  # its role and state as it reports them now (pools follow)

    def call(self, rid: str) -> Call:
        return Call(self, rid)

    def abort_soon(self, rid: str) -> None:
        """Tell the worker to drop a request, in a task of its own: this runs while requests are
        being cancelled (client gone), where an awaited send could itself be cancelled half-way
        and leave blocks held."""
        async def send() -> None:
            if self.client.connected:
                try:
                    await self.client.send(m.Abort(rid))
                except (OSError, ConnectionError):
                    pass  # the worker is gone, and its blocks with it

        task = asyncio.ensure_future(send())
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)


class Call:
    """One request's exchange with one worker, from the first message to `close`.

    Use it as a context manager: on exit its breaker dispatch ends (a fault of this worker:
    failure; the worker answered properly: success; anything else: neutral) and, unless `done`,
    the worker is told to drop the request (a late reply must not leave blocks held)."""

    def __init__(self, worker: Worker, rid: str) -> None:
        self.worker, self.rid = worker, rid
        self.queue = worker.client.open(rid)
        self.dispatch = worker.breaker.dispatch(time.monotonic())
        self.answered = False  # the worker replied properly at least once (tokens, a reservation)
        self.done = False  # the worker holds nothing more for this request
        self.closed = False
        self.on_progress: Callable[[], Awaitable[None]] | None = None  # called on each Progress it sends
        worker.inflight += 1

    def __enter__(self) -> Call:
        return self

    def __exit__(self, typ: object, exc: BaseException | None, tb: object) -> None:
        self.close(exc)

    def close(self, exc: BaseException | None = None) -> None:
        """End the exchange (once): `exc` is what ended it, if anything did."""
        if self.closed:
            return
        self.closed = True
        blamed = exc is not None and self.blames(exc)
        outcome = Outcome.FAILURE if blamed else Outcome.SUCCESS if self.answered else Outcome.NEUTRAL
        self.dispatch.end(outcome, time.monotonic())
        self.worker.inflight -= 1
        self.worker.client.close_queue(self.rid)
        if not self.done:
            self.worker.abort_soon(self.rid)

    def blames(self, exc: BaseException) -> bool:
        """Is this worker at fault (not its link, not the client, not overload)?"""
        if isinstance(exc, Retryable):
            return exc.fault and not exc.transfer and exc.worker == self.worker.name
        return isinstance(exc, WorkerFailed) and exc.worker == self.worker.name

    @property
    def name(self) -> str:
        return self.worker.name

    async def send(self, msg: m.ToWorker) -> None:
        try:
            await self.worker.client.send(msg)
        except (OSError, ConnectionError, TimeoutError) as e:
            raise Retryable(f"cannot reach {self.name}: {e}", self.name) from e

    async def reply(self, timeout: float) -> m.ToRouter:
        """The next message for this request; skips messages that carry no tokens (TransferDone,
        Progress). `timeout` bounds the worker's silence: a Progress starts the wait afresh."""
        while True:
            try:
                msg = await asyncio.wait_for(self.queue.get(), timeout)
            except TimeoutError:
                raise Retryable(f"{self.name} silent for {timeout:.0f}s", self.name) from None
            if msg is None:
                raise Retryable(f"lost the connection to {self.name}", self.name)
            if isinstance(msg, m.Progress):
                if self.on_progress is not None:
                    await self.on_progress()
                continue
            if not isinstance(msg, m.TransferDone):
                return msg

    async def next(self, timeout: float) -> TokenEvent:
        """The next token event; the request's end sets `done`."""
        msg = await self.reply(timeout)
        if not isinstance(msg, m.Tokens):
            raise Retryable(f"{self.name} sent an unexpected {type(msg).__name__}", self.name)
        if msg.error is not None:
            why = f"{self.name}: {msg.error}"
            if msg.error_kind == "transfer":
                raise Retryable(why, self.name, transfer=True)
            if msg.error_kind in ("overloaded", "draining"):
                raise Retryable(why, self.name, fault=False)
            if msg.error_kind == "invalid":
                raise BackendError(why, 400)
            raise WorkerFailed(why, self.name)
        self.answered = True
        self.done = msg.finish_reason is not None
        return TokenEvent(list(msg.token_ids), msg.finish_reason, timings=dict(msg.timings),
                          num_cached_tokens=msg.num_cached_tokens,
                          logprobs=[TokenLogprobs(lp.logprob, list(lp.top)) for lp in msg.logprobs] or None,
                          prompt_logprobs=[TokenLogprobs(lp.logprob, list(lp.top))
                                           for lp in msg.prompt_logprobs] or None)


class Placement:
    """The router's own count of the work it sent one worker, live (see `WorkerLoad`): `tokens`
    prompt tokens to compute until `first_token()`, then (with `generates`) one generating
    sequence until the block ends, however it ends."""

    def __init__(self, worker: Worker, tokens: int, generates: bool) -> None:
        self.load, self.tokens, self.generates = worker.load, tokens, generates
        self.state = "new"  # new -> pending -> generating -> closed

    def __enter__(self) -> Placement:
        self.load.pending_tokens += self.tokens
        self.state = "pending"
        return self

    def first_token(self) -> None:
        if self.state != "pending":
            return
        self.load.pending_tokens -= self.tokens
        self.state = "generating"
        if self.generates:
            self.load.decoding += 1

    def __exit__(self, typ: object, exc: BaseException | None, tb: object) -> None:
        if self.state == "pending":
            self.load.pending_tokens -= self.tokens
        elif self.state == "generating" and self.generates:
            self.load.decoding -= 1
        self.state = "closed"


def queue_gauges(s: m.Stats | None) -> dict[str, float]:
    """A worker's queues by stage and KV use, from its last heartbeat."""
    if s is None:
        return {}
    return {"num_requests_waiting": float(s.waiting), "num_requests_running": float(s.running),
            "queued_prompt_tokens": float(s.queued_prompt_tokens), "kv_reservations": float(s.reserved),
            "kv_transfers_in_flight": float(s.transfers_in_flight),
            "kv_cache_usage": 1.0 - s.free_blocks / s.total_blocks if s.total_blocks else 0.0}
