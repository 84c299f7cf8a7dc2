"""What every cluster worker shares, whatever its role: the engine, the RPC server, admission, results.

A worker is a policy (its role) over one model replica and its KV cache, speaking the internal
RPC to the router. This base owns the parts that do not depend on the role: building the engine,
serving RPC, answering stats and aborts, refusing work while draining, turning a message into a
`Request` (or a reason to refuse it), and streaming the engine's tokens back to the router. Each
role (`colocated_worker`, `prefill_worker`, `decode_worker`) says which messages it takes, how it
admits them, and what happens around its KV transfers; `pd_worker` picks the class for a role.
A role switch (`role_host.py`) stops one role's engine and builds the next over the same `Shared`
(weights, KV memory, RPC server): `start_role`/`stop_role` are each role's own part of that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from typing import Generic, Protocol, TypeVar

import msgspec

from pdserve.engine.core import EngineCore, Policy, StepResult
from pdserve.engine.grammar import compiler_factory
from pdserve.engine.sampler import BatchSampler
from pdserve.sched.admission import admission_error, limits_for
from pdserve.sched.request import Request, RequestStatus
from pdserve.serve import messages as m
from pdserve.serve.async_engine import EngineThread
from pdserve.serve.engine_args import EngineArgs
from pdserve.serve.rpc import Peer
from pdserve.serve.step_delay import StepDelay
from pdserve.serve.tracing import Tracer
from pdserve.serve.worker_shared import Shared

log = logging.getLogger("pdserve.worker")
POLL_S = 0.002  # transfer state polling while transfers are in flight
IDLE_POLL_S = 0.05


class WorkerPolicy(Policy, Protocol):
    """The scheduling policy a role runs, as the shared worker code uses it."""

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_running(self) -> int: ...


P = TypeVar("P", bound=WorkerPolicy)


class WorkerBase(Generic[P]):
    """One worker process's state and message loop; subclasses are the roles."""

    role = ""

    def __init__(self, args: argparse.Namespace, shared: Shared | None = None) -> None:
        """`shared`: the model, KV memory and RPC server of the role this one replaces (a role
        switch, serve/role_host.py); None: load them."""
        ea = EngineArgs.from_namespace(args)
        if shared is None:
            ea.apply_threads()
            shared = Shared.load(args, ea)
        self.args, self.shared = args, shared
        self.runner, self.bm, self.rpc = shared.runner, shared.bm, shared.rpc
        self.secret, self.node_id, self.telemetry = shared.secret, shared.node_id, shared.telemetry
        self.transfer = args.cluster.transfer  # the settings, from pdserve.config.schema
        self.policy: P = self._make_policy(args, ea)
        shape = self.runner.shape
        self.core = EngineCore(self.runner, self.policy, sampler=BatchSampler(  # openai: grammar needs the tokenizer
            compiler_factory(ea.model, shape.vocab_size, list(shape.eos_token_ids))))
        self.thread = EngineThread(self.core, self._on_step)
        self.rpc.handler, self.rpc.on_close = self._handle, self._peer_gone  # this role answers from now on
        self.owners: dict[str, Peer] = {}  # request id -> the router connection to answer on
        self.requests: dict[str, Request] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.switching = ""  # the role a switch is turning this worker into (it drains meanwhile)
        self.max_waiting = args.cluster.max_waiting  # queue bound: beyond it new work is refused (overload)
        self._transfer_started = asyncio.Event()  # wakes the idle transfer poller
        self._poller: asyncio.Task[None] | None = None
        c = args.cluster
        self.step_delay = StepDelay(self.role, c.fault_prefill_delay_ms, c.fault_decode_step_delay_ms,
                                    c.fault_delay_file)
        self.tracer = Tracer(c.router.otlp_traces_endpoint, f"pdserve-{self.role}")
        self.traceparents: dict[str, str] = {}  # request id -> the router's trace context (tracing on)

    # ---- what a role defines ------------------------------------------------------------------
    def _make_policy(self, args: argparse.Namespace, ea: EngineArgs) -> P:
        raise NotImplementedError

    async def _handle_work(self, msg: m.ToWorker, peer: Peer) -> None:
        """A message that asks for work (the worker is not draining); the role admits or refuses it."""
        await self._refuse(msg, peer, f"a {self.role} worker does not take {type(msg).__name__}", "invalid")

    def _on_start(self, msg: m.Start) -> None:
        """The router says a request's first token came (decode role); others have nothing to do."""

    def _on_renew(self, msg: m.Renew, peer: Peer) -> None:
        """The router says a reserved request's prefill is progressing (decode role); others hold no reservations."""

    def _on_token(self, req: Request, tok: int, done: Request | None) -> m.Tokens:
        """What to tell the router about a token the engine produced for `req`."""
        reply = self._tokens(req, [tok], done)
        if done is not None:
            self._forget(req.request_id, done)
        return reply

    def _busy(self) -> bool:
        """Work that drain() waits for besides the requests themselves."""
        return False

    def _transfers_in_flight(self) -> bool:
        return False

    def _poll_transfers_once(self) -> None:
        """Check transfer states (called every POLL_S while some are in flight, else every IDLE_POLL_S)."""

    def _abort_transfer(self, rid: str) -> None:
        """Stop moving the request's KV (before the engine forgets it)."""

    def _start_transfers(self) -> None:
        """Bring the transfer plane up, before the worker says READY."""

    def _close_transfers(self) -> None:
        """Take the transfer plane down, after the engine stopped."""

    def _stats_extra(self) -> dict[str, int]:
        """Role-specific Stats fields."""
        return {}

    # ---- lifecycle --------------------------------------------------------------------------
    def _delay_steps(self) -> None:
        """Fault injection: each step sleeps before its first layer, inside the step (its duration,
        the request's phase times and the KV push all see it), then runs the role's own hook."""
        inner = self.core.layer_hook

        def hook(out, layer: int) -> None:  # type: ignore[no-untyped-def]
            if layer == 0 and (delay := self.step_delay.seconds(time.monotonic())):
                time.sleep(delay)
            if inner is not None:
                inner(out, layer)

        self.core.layer_hook = hook

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain and stop; a role switch keeps the process (RoleHost)."""
        from pdserve.serve.role_host import RoleHost

        await RoleHost(self).run()

    def start_role(self) -> None:
        """Start this role's engine, transfer plane and poller (in the event loop)."""
        self.loop = asyncio.get_running_loop()
        if self.step_delay.configured:
            self._delay_steps()
        self._start_transfers()
        self.thread.start()
        self._poller = asyncio.create_task(self._poll_transfers())

    async def stop_role(self) -> None:
        """Stop what `start_role` started; the model, KV memory and RPC server stay (`shared`)."""
        if self._poller is not None:
            self._poller.cancel()
        await asyncio.to_thread(self.thread.stop)
        self._close_transfers()
        self.tracer.shutdown()

    def _handed_back(self) -> list[str]:
        """The requests a switch ends rather than waits for (all it still holds, by default)."""
        return list(self.requests)

    async def drain(self, timeout: float = 60.0) -> None:
        """Take no new work; let in-flight requests and transfers finish. Stats say draining meanwhile."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while (self.requests or self._busy()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # ---- messages from the router -----------------------------------------------------------
    async def _handle(self, msg: m.ToWorker, peer: Peer) -> None:
        if isinstance(msg, m.StatsQuery):
            await peer.send(self._stats(msg.nonce, msg.kv_events))
        elif isinstance(msg, m.Abort):
            self._abort(msg.request_id)
        elif isinstance(msg, m.Start):
            self._on_start(msg)
        elif isinstance(msg, m.Renew):  # a draining worker still holds (and renews) its reservations
            self._on_renew(msg, peer)
        elif self.draining:
            await self._refuse(msg, peer, "worker is draining")
        else:
            await self._handle_work(msg, peer)

    async def _refuse(self, msg: m.ToWorker, peer: Peer, why: str, kind: str = "draining") -> None:
        rid = getattr(msg, "request_id", "")
        if isinstance(msg, m.Reserve):
            await peer.send(m.Reserved(rid, False, reason=why))
        else:
            await peer.send(m.Tokens(rid, [], error=why, error_kind=kind))

    def _make(self, msg: m.Generate | m.Reserve | m.Prefill) -> Request | str:
        try:
            params = msg.params.sampling()
        except ValueError as e:
            return str(e)
        # openai: a grammar that does not compile is refused here, not mid-step. Not while the
        # compiler is first built (seconds): a Reserve must be answered within reserve_timeout_s and
        # this loop keeps answering heartbeats; the router's front compiled this grammar with the
        # same xgrammar and tokenizer, and the engine thread waits for the build if it comes first.
        if params.guided is not None and not self.core.sampler.warm():
            try:
                self.core.sampler.check(params.guided)
            except ValueError as e:
                return str(e)
        limits = limits_for(self.policy, self.runner.shape.max_model_len, self.runner.shape.vocab_size)
        why = admission_error(msg.prompt_token_ids, params.max_tokens,
                              limits.for_reservation() if isinstance(msg, m.Reserve) else limits)
        if why is not None:  # it could never finish here: refuse it rather than queue it for good
            return why
        if msg.request_id in self.requests:
            return f"request id {msg.request_id!r} is already in use"
        if msg.traceparent:
            self.traceparents[msg.request_id] = msg.traceparent
        return self.core.make_request(msg.request_id, msg.prompt_token_ids, params)

    def _admit(self, msg: m.Generate | m.Prefill, peer: Peer) -> bool:
        if self.policy.num_waiting >= self.max_waiting:
            asyncio.ensure_future(peer.send(m.Tokens(msg.request_id, [], error="queue full",
                                                     error_kind="overloaded")))
            return False
        req = self._make(msg)
        if isinstance(req, str):
            asyncio.ensure_future(peer.send(m.Tokens(msg.request_id, [], error=req, error_kind="invalid")))
            return False
        self.owners[req.request_id] = peer
        self.requests[req.request_id] = req
        delay = self.transfer.fault_prompt_delay_ms / 1000
        if delay > 0 and self.loop is not None:  # fault injection: a slow worker
            self.loop.call_later(delay, self._add_if_wanted, req)
        else:
            self.thread.submit(lambda: self.core.add(req))
        return True

    def _add_if_wanted(self, req: Request) -> None:
        """A held prompt goes to the engine unless it was aborted meanwhile."""
        if self.requests.get(req.request_id) is req:
            self.thread.submit(lambda: self.core.add(req))

    def _abort(self, rid: str) -> None:
        self._abort_transfer(rid)
        loop = self.loop

        def abort() -> None:  # engine thread
            self.policy.abort(rid, self.core.clock())
            if loop is not None:
                loop.call_soon_threadsafe(self._forget, rid, None)

        self.thread.submit(abort)

    def _peer_gone(self, peer: Peer) -> None:
        """A router connection closed: no Abort can come over it any more and nobody reads its
        tokens (the router retries such requests elsewhere), so drop what it owned, reservations
        included, instead of holding them until they expire or finish."""
        for rid in [rid for rid, owner in self.owners.items() if owner is peer]:
            self._abort(rid)

    def _forget(self, rid: str, req: Request | None) -> None:
        self.requests.pop(rid, None)
        self.owners.pop(rid, None)
        self.traceparents.pop(rid, None)

    # ---- engine results (engine thread -> event loop) ---------------------------------------
    def _on_step(self, result: StepResult) -> None:
        assert self.loop is not None
        self.telemetry.step.observe(result.duration)
        self.telemetry.step_tokens.inc(result.output.num_batched_tokens)
        self.loop.call_soon_threadsafe(self._dispatch, result)

    def _dispatch(self, result: StepResult) -> None:
        finished = {r.request_id: r for r in result.finished}
        out: dict[Peer, list[m.Tokens]] = {}
        for rid, tok in result.new_tokens.items():
            req = self.requests.get(rid)
            peer = self.owners.get(rid)
            if req is None or peer is None:
                continue
            msg = self._on_token(req, tok, finished.get(rid))
            lp = result.logprobs.get(rid)
            if lp is not None:  # openai: the token's logprobs ride with it
                msg = msgspec.structs.replace(msg, logprobs=[m.Logprob.of(lp)])
            plp = result.prompt_logprobs.get(rid)
            if plp:
                msg = msgspec.structs.replace(msg, prompt_logprobs=[m.Logprob.of(x) for x in plp])
            out.setdefault(peer, []).append(msg)
        for peer, msgs in out.items():
            asyncio.ensure_future(send_all(peer, msgs))

    def _tokens(self, req: Request, toks: list[int], done: Request | None) -> m.Tokens:
        if done is None:
            return m.Tokens(req.request_id, toks)
        timings = {}
        if done.first_token_time is not None and done.finished_time is not None:
            timings["decode"] = done.finished_time - done.first_token_time
        timings.update(self._finish_timings(done))
        if self.tracer.enabled:
            self._trace_finished(done, prefilled_here="transfer" not in timings)
        return m.Tokens(req.request_id, toks, done.status.finish_reason, timings=timings,
                        num_cached_tokens=done.num_cached_tokens)

    def _trace_finished(self, done: Request, prefilled_here: bool) -> None:
        tp = self.traceparents.get(done.request_id, "")
        if prefilled_here:
            self._trace_prefill(done, tp)
        self.tracer.record("decode", tp, done.first_token_time, done.finished_time, worker_role=self.role,
                           output_tokens=len(done.output_token_ids))

    def _trace_prefill(self, req: Request, tp: str) -> None:
        self.tracer.record("prefill_queue", tp, req.arrival_time, req.first_scheduled_time, worker_role=self.role)
        self.tracer.record("prefill", tp, req.first_scheduled_time, req.first_token_time, worker_role=self.role,
                           prompt_tokens=req.num_prompt_tokens, cached_tokens=req.num_cached_tokens)

    def _finish_timings(self, done: Request) -> dict[str, float]:
        """Timings of a request prefilled here: queue and prefill (decode adds transfer waits)."""
        timings = prefill_timings(done)
        timings["queue"] = timings.pop("prefill_queue", 0.0)
        self.telemetry.cache_queries.inc(done.num_prompt_tokens)
        self.telemetry.cache_hits.inc(done.num_cached_tokens)
        return timings

    # ---- transfers ---------------------------------------------------------------------------
    async def _poll_transfers(self) -> None:
        while True:
            if self._transfers_in_flight():
                await asyncio.sleep(POLL_S)
            else:  # idle: sleep until a transfer starts (or a while, for reservation expiry)
                self._transfer_started.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._transfer_started.wait(), IDLE_POLL_S)
            self._poll_transfers_once()

    def _finish_now(self, req: Request) -> None:
        peer = self.owners.get(req.request_id)
        if peer is not None:
            asyncio.ensure_future(send_all(peer, [self._tokens(req, [], req)]))
        self._forget(req.request_id, req)

    def _error_now(self, rid: str, err: str, kind: str) -> None:
        peer = self.owners.get(rid)
        if peer is not None:
            asyncio.ensure_future(send_all(peer, [m.Tokens(rid, [], error=err, error_kind=kind)]))
        self._forget(rid, None)

    def _stats(self, nonce: str, kv_events: bool = False) -> m.Stats:
        p = self.policy
        elapsed = max(1e-9, time.monotonic() - self.thread.started_at)
        stored, evicted, cleared = self.bm.take_events() if kv_events else ([], [], False)
        return m.Stats(
            nonce=nonce, role=self.role, running=p.num_running, waiting=p.num_waiting,
            free_blocks=self.bm.num_free_blocks, total_blocks=self.bm.num_blocks,
            busy_fraction=self.thread.busy_time / elapsed,
            block_size=self.bm.block_size, draining=self.draining, node_id=self.node_id, kv_stored=stored, kv_evicted=evicted,
            kv_cleared=cleared, cache_salt=self.bm.salt, metrics=self.telemetry.families(),
            switching=self.switching, **self._stats_extra(),
        )


def first_token_finish(req: Request, tok: int) -> str | None:
    """Does the prefill's first token already end the request?"""
    if tok in req.stop_token_ids and req.min_tokens == 0:
        return RequestStatus.FINISHED_STOPPED.finish_reason
    if req.max_tokens <= 1:
        return RequestStatus.FINISHED_LENGTH.finish_reason
    return None


def prefill_timings(req: Request) -> dict[str, float]:
    t: dict[str, float] = {}
    if req.first_scheduled_time is not None:
        t["prefill_queue"] = req.first_scheduled_time - req.arrival_time
        if req.first_token_time is not None:
            t["prefill"] = req.first_token_time - req.first_scheduled_time
    return t


async def send_all(peer: Peer, msgs: list) -> None:  # type: ignore[type-arg]
    try:
        for msg in msgs:
            await peer.send(msg)
    except (ConnectionError, OSError):
        log.info("router connection gone; dropping %d messages", len(msgs))
