"""A cluster worker: prefill, decode or colocated, speaking the internal RPC to the router.

Prefill: Prefill(prompt, decode's KV address and blocks) ──▶ queue ──▶ batch ──▶ each layer's KV
  is pushed to the decode worker as soon as the layer is computed ──▶ Tokens(first token) to the
  router at once ──▶ TransferDone when every layer is acknowledged; then the blocks are freed.
Decode: Reserve ──▶ blocks held, KV receiver told what to expect ──▶ Start(first token) ──▶
  once the KV is complete and verified the request joins the batch ──▶ Tokens(...) stream.
  Generate (short prompts, fallbacks) runs prefill and decode here. Colocated: Generate only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time

from pdserve.config.engine import DecodeConfig, PrefillConfig, TransferConfig
from pdserve.engine.core import EngineCore, StepResult
from pdserve.engine.model_runner import ModelRunner
from pdserve.sched.admission import admission_error, limits_for
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.colocated import ColocatedScheduler
from pdserve.sched.decode import DecodeScheduler
from pdserve.sched.prefill import PrefillBatcher
from pdserve.sched.request import Request, RequestStatus
from pdserve.serve import messages as m
from pdserve.serve.async_engine import EngineThread
from pdserve.serve.engine_args import EngineArgs
from pdserve.serve.kv_bridge import CacheSink, blocks_as_array
from pdserve.serve.rpc import Peer, RpcServer, cluster_secret
from pdserve.transfer import KVPoll, KVReceiver, KVSender

log = logging.getLogger("pdserve.worker")
POLL_S = 0.002  # transfer state polling while transfers are in flight
IDLE_POLL_S = 0.05


class PDWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        ea = EngineArgs.from_namespace(args)
        ea.apply_threads()
        self.role: str = args.role
        self.runner = ModelRunner(ea.model, ea.cache, device=ea.device, dtype=ea.dtype, seed=ea.seed)
        self.bm = BlockManager(self.runner.num_blocks, ea.cache.block_size, ea.cache.enable_prefix_caching,
                               ea.cache.eviction)
        self.secret = cluster_secret()
        self.transfer = TransferConfig(transport=args.transport, bandwidth_gbps=args.bandwidth_gbps,
                                       latency_ms=args.latency_ms, fault_corrupt_prob=args.fault_corrupt_prob,
                                       fault_cut_prob=args.fault_cut_prob)
        self.policy: ColocatedScheduler | PrefillBatcher | DecodeScheduler
        if self.role == "prefill":
            self.policy = PrefillBatcher(PrefillConfig(
                max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                target_utilization=args.target_utilization, max_num_seqs=ea.scheduler.max_num_seqs,
                length_buckets=args.length_buckets), self.bm)
        elif self.role == "decode":
            self.policy = DecodeScheduler(DecodeConfig(
                max_batch_size=args.max_batch_size, max_num_seqs=max(args.max_batch_size, ea.scheduler.max_num_seqs),
                max_num_batched_tokens=ea.scheduler.max_num_batched_tokens,
                adaptive_batch=args.adaptive_batch, tpot_target_ms=args.tpot_target_ms,
                min_batch_size=min(8, args.max_batch_size),
                reservation_timeout_s=args.transfer_timeout_s), self.bm)
        else:
            self.policy = ColocatedScheduler(ea.scheduler, self.bm)
        self.core = EngineCore(self.runner, self.policy)
        self.thread = EngineThread(self.core, self._on_step)
        self.rpc = RpcServer(self._handle, args.host, args.port, self.secret)
        self.owners: dict[str, Peer] = {}  # request id -> the router connection to answer on
        self.requests: dict[str, Request] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.max_waiting = args.max_waiting  # queue bound: beyond it new work is refused (overload)
        # prefill: where each request's KV goes; requests whose transfer is in flight
        self.kv_dest: dict[str, m.Prefill] = {}
        self.sending: dict[str, float] = {}
        self.sender: KVSender | None = None
        # decode: requests whose first token came and whose KV is awaited
        self.receiver: KVReceiver | None = None
        self.awaiting: dict[str, tuple[int, float]] = {}
        self._transfer_started = asyncio.Event()  # wakes the idle transfer poller
        self.transfer_wait: dict[str, float] = {}  # KV still arriving after the first token, seconds
        if self.role == "prefill":
            self.sender = KVSender(self.transfer, secret=self.secret, timeout_s=args.transfer_timeout_s)
            self.core.layer_hook = self._push_layer
        if self.role == "decode":
            self.receiver = KVReceiver(CacheSink(self.runner), self.transfer, host=args.host, secret=self.secret,
                                       timeout_s=args.transfer_timeout_s)

    # ---- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.receiver is not None:
            self.receiver.start()
        self.thread.start()
        await self.rpc.start()
        stop = asyncio.Event()
        self.loop.add_signal_handler(signal.SIGTERM, stop.set)
        self.loop.add_signal_handler(signal.SIGINT, stop.set)
        poller = asyncio.create_task(self._poll_transfers())
        log.info("%s worker ready on %s:%d (%d KV blocks)", self.role, self.rpc.host, self.rpc.port, self.bm.num_blocks)
        print(f"READY {self.role} {self.rpc.host}:{self.rpc.port} pid={os.getpid()}", flush=True)
        await stop.wait()
        await self.drain()
        poller.cancel()
        await self.rpc.close()
        self.thread.stop()
        if self.sender is not None:
            self.sender.close()
        if self.receiver is not None:
            self.receiver.close()

    async def drain(self, timeout: float = 60.0) -> None:
        """Take no new work; let in-flight requests and transfers finish."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while (self.requests or self.sending) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # ---- messages from the router -----------------------------------------------------------
    async def _handle(self, msg: m.ToWorker, peer: Peer) -> None:
        if isinstance(msg, m.StatsQuery):
            await peer.send(self._stats(msg.nonce))
        elif isinstance(msg, m.Abort):
            self._abort(msg.request_id)
        elif isinstance(msg, m.Start):
            if msg.request_id in self.requests:
                self.awaiting[msg.request_id] = (msg.first_token, time.monotonic())
                self._transfer_started.set()
        elif self.draining:
            await self._refuse(msg, peer, "worker is draining")
        elif isinstance(msg, m.Reserve) and self.role == "decode":
            await peer.send(self._reserve(msg, peer))
        elif isinstance(msg, m.Prefill) and self.role == "prefill":
            if self._admit(msg, peer):
                self.kv_dest[msg.request_id] = msg
                assert isinstance(self.policy, PrefillBatcher)
                self.policy.set_decode_pressure(msg.decode_free_fraction)
        elif isinstance(msg, m.Generate) and self.role != "prefill":
            self._admit(msg, peer)
        else:
            await self._refuse(msg, peer, f"a {self.role} worker does not take {type(msg).__name__}", "invalid")

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
        limits = limits_for(self.policy, self.runner.shape.max_model_len, self.runner.shape.vocab_size)
        why = admission_error(msg.prompt_token_ids, params.max_tokens,
                              limits.for_reservation() if isinstance(msg, m.Reserve) else limits)
        if why is not None:  # it could never finish here: refuse it rather than queue it for good
            return why
        if msg.request_id in self.requests:
            return f"request id {msg.request_id!r} is already in use"
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
        self.thread.submit(lambda: self.core.add(req))
        return True

    def _reserve(self, msg: m.Reserve, peer: Peer) -> m.Reserved:
        assert isinstance(self.policy, DecodeScheduler) and self.receiver is not None
        req = self._make(msg)
        if isinstance(req, str):
            return m.Reserved(msg.request_id, False, reason=f"invalid: {req}")
        with self.core.lock:  # answers at once, between (not after) engine steps
            ok = self.policy.reserve(req, self.core.clock())
        if not ok:
            return m.Reserved(msg.request_id, False, reason="no KV blocks or sequence slots free")
        self.owners[req.request_id] = peer
        self.requests[req.request_id] = req
        n = self.bm.blocks_needed(req.num_prompt_tokens)
        self.receiver.expect(req.request_id, self.runner.shape.num_layers, req.block_ids[:n])
        return m.Reserved(req.request_id, True, self.receiver.address(), list(req.block_ids[:n]), self.bm.block_size)

    def _abort(self, rid: str) -> None:
        self.awaiting.pop(rid, None)
        if self.sender is not None and rid in self.sending:
            self.sender.abort(rid)
        if self.receiver is not None and rid in self.requests:
            self.receiver.drop(rid)
        loop = self.loop

        def abort() -> None:  # engine thread
            self.policy.abort(rid, self.core.clock())
            if loop is not None:
                loop.call_soon_threadsafe(self._forget, rid, None)

        self.thread.submit(abort)

    def _forget(self, rid: str, req: Request | None) -> None:
        self.transfer_wait.pop(rid, None)
        self.requests.pop(rid, None)
        self.owners.pop(rid, None)
        self.kv_dest.pop(rid, None)

    # ---- engine results (engine thread -> event loop) ---------------------------------------
    def _on_step(self, result: StepResult) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._dispatch, result)

    def _dispatch(self, result: StepResult) -> None:
        finished = {r.request_id: r for r in result.finished}
        out: dict[Peer, list[m.Tokens]] = {}
        for rid, tok in result.new_tokens.items():
            req = self.requests.get(rid)
            peer = self.owners.get(rid)
            if req is None or peer is None:
                continue
            if self.role == "prefill":
                reason = _first_token_finish(req, tok)
                out.setdefault(peer, []).append(m.Tokens(rid, [tok], reason, timings=_prefill_timings(req),
                                                         num_cached_tokens=req.num_cached_tokens))
                self.sending[rid] = time.monotonic()
                self._transfer_started.set()
                continue
            done = finished.get(rid)
            out.setdefault(peer, []).append(self._tokens(req, [tok], done))
            if done is not None:
                self._forget(rid, done)
        for peer, msgs in out.items():
            asyncio.ensure_future(_send_all(peer, msgs))

    def _tokens(self, req: Request, toks: list[int], done: Request | None) -> m.Tokens:
        if done is None:
            return m.Tokens(req.request_id, toks)
        timings = {}
        if done.first_token_time is not None and done.finished_time is not None:
            timings["decode"] = done.finished_time - done.first_token_time
        wait = self.transfer_wait.pop(req.request_id, None)
        if wait is not None:
            timings["transfer"] = wait
        else:  # prefilled here (colocated role, or a decode worker running a short prompt whole)
            timings.update(_prefill_timings(done))
            timings["queue"] = timings.pop("prefill_queue", 0.0)
        return m.Tokens(req.request_id, toks, done.status.finish_reason, timings=timings,
                        num_cached_tokens=done.num_cached_tokens)

    def _push_layer(self, out, layer: int) -> None:  # type: ignore[no-untyped-def]
        """Engine thread, prefill role: layer `layer` of this batch is computed; ship it."""
        assert self.sender is not None
        for chunk in out.chunks:
            req = chunk.request
            dest = self.kv_dest.get(req.request_id)
            if dest is None:
                continue
            n = self.bm.blocks_needed(req.num_prompt_tokens)
            data, dtype = blocks_as_array(self.runner, layer, req.block_ids[:n])
            self.sender.send_layer(req.request_id, dest.kv_address, layer, self.runner.shape.num_layers,
                                   dest.block_ids[:n], data, dtype=dtype)

    # ---- transfers ---------------------------------------------------------------------------
    async def _poll_transfers(self) -> None:
        last_expiry = 0.0
        while True:
            if self.sending or self.awaiting:
                await asyncio.sleep(POLL_S)
            else:  # idle: sleep until a transfer starts (or a while, for reservation expiry)
                self._transfer_started.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._transfer_started.wait(), IDLE_POLL_S)
            if self.sender is not None:
                self._poll_sends()
            if self.receiver is not None:
                self._poll_receives()
                if time.monotonic() - last_expiry > 0.5:
                    last_expiry = time.monotonic()
                    self.thread.submit(self._expire)

    def _poll_sends(self) -> None:
        assert self.sender is not None and isinstance(self.policy, PrefillBatcher)
        for rid, started in list(self.sending.items()):
            try:
                state = self.sender.poll(rid)
            except KeyError:
                state = KVPoll.FAILED if rid not in self.requests else KVPoll.BOOTSTRAPPING
            if state not in (KVPoll.SUCCESS, KVPoll.FAILED):
                continue
            del self.sending[rid]
            req = self.requests.get(rid)
            peer = self.owners.get(rid)
            if peer is not None:
                asyncio.ensure_future(_send_all(peer, [m.TransferDone(
                    rid, state is KVPoll.SUCCESS, time.monotonic() - started, self.sender.error(rid))]))
            if req is not None:
                self.thread.submit(lambda req=req: self.policy.release(req, self.core.clock()))  # type: ignore[union-attr]
            self._forget(rid, req)

    def _poll_receives(self) -> None:
        assert self.receiver is not None and isinstance(self.policy, DecodeScheduler)
        for rid, (first, since) in list(self.awaiting.items()):
            state = self.receiver.poll(rid)
            if state is KVPoll.SUCCESS:
                del self.awaiting[rid]
                wait = time.monotonic() - since
                self.thread.submit(lambda rid=rid, first=first, wait=wait: self._kv_ready(rid, first, wait))
            elif state is KVPoll.FAILED:
                del self.awaiting[rid]
                err = self.receiver.error(rid)
                self.thread.submit(lambda rid=rid, err=err: self._kv_failed(rid, err))

    def _kv_ready(self, rid: str, first: int, wait: float) -> None:
        """Engine thread: KV complete and verified; the request joins on the next step."""
        assert isinstance(self.policy, DecodeScheduler)
        self.transfer_wait[rid] = wait
        done = self.policy.remote_kv_done(rid, first, self.core.clock())
        if done is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self._finish_now, done)

    def _kv_failed(self, rid: str, err: str) -> None:
        assert isinstance(self.policy, DecodeScheduler)
        req = self.policy.remote_kv_failed(rid, self.core.clock())
        if req is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self._error_now, rid, f"KV transfer failed: {err}", "transfer")

    def _expire(self) -> None:
        assert isinstance(self.policy, DecodeScheduler) and self.loop is not None
        for req in self.policy.expire_reservations(self.core.clock()):
            log.warning("KV reservation for %s expired: its KV never arrived and nobody released it", req.request_id)
            self.loop.call_soon_threadsafe(self._error_now, req.request_id, "KV reservation expired", "transfer")

    def _finish_now(self, req: Request) -> None:
        peer = self.owners.get(req.request_id)
        if peer is not None:
            asyncio.ensure_future(_send_all(peer, [self._tokens(req, [], req)]))
        self._forget(req.request_id, req)

    def _error_now(self, rid: str, err: str, kind: str) -> None:
        if self.receiver is not None:
            self.receiver.drop(rid)
        peer = self.owners.get(rid)
        if peer is not None:
            asyncio.ensure_future(_send_all(peer, [m.Tokens(rid, [], error=err, error_kind=kind)]))
        self._forget(rid, None)

    def _stats(self, nonce: str) -> m.Stats:
        p = self.policy
        elapsed = max(1e-9, time.monotonic() - self.thread.started_at)
        return m.Stats(
            nonce=nonce, role=self.role, running=p.num_running, waiting=p.num_waiting,
            free_blocks=self.bm.num_free_blocks, total_blocks=self.bm.num_blocks,
            busy_fraction=self.thread.busy_time / elapsed,
            queued_prompt_tokens=p.queued_tokens if isinstance(p, PrefillBatcher) else 0,
            reserved=p.num_reserved if isinstance(p, DecodeScheduler) else 0,
            block_size=self.bm.block_size, draining=self.draining,
        )


def _first_token_finish(req: Request, tok: int) -> str | None:
    """Does the prefill's first token already end the request?"""
    if tok in req.stop_token_ids and req.min_tokens == 0:
        return RequestStatus.FINISHED_STOPPED.finish_reason
    if req.max_tokens <= 1:
        return RequestStatus.FINISHED_LENGTH.finish_reason
    return None


def _prefill_timings(req: Request) -> dict[str, float]:
    t: dict[str, float] = {}
    if req.first_scheduled_time is not None:
        t["prefill_queue"] = req.first_scheduled_time - req.arrival_time
        if req.first_token_time is not None:
            t["prefill"] = req.first_token_time - req.first_scheduled_time
    return t


async def _send_all(peer: Peer, msgs: list) -> None:  # type: ignore[type-arg]
    try:
        for msg in msgs:
            await peer.send(msg)
    except (ConnectionError, OSError):
        log.info("router connection gone; dropping %d messages", len(msgs))


def run_pd_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(PDWorker(args).run())
    return 0
