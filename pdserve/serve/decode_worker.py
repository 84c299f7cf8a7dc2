"""The decode role: reserve KV blocks, receive a prefill worker's KV into them, then decode.

Reserve ──▶ blocks held, the KV receiver told what to expect ──▶ Reserved(address, blocks) ──▶
Start(first token) ──▶ once the KV is complete and verified the request joins the batch ──▶
Tokens(...) stream. A reservation whose KV never comes expires, `reservation_timeout_s` after it
was made or last renewed (the router relays a Renew each time the prefill reports progress, and
Start renews it once more); a failed transfer ends the request with a `transfer` error so the
router can retry it elsewhere. Generate (short prompts, fallbacks) runs prefill and decode here,
as a colocated worker would.
"""

from __future__ import annotations

import argparse
import logging
import time

from pdserve.sched.decode import DecodeScheduler
from pdserve.sched.request import Request
from pdserve.serve import messages as m
from pdserve.serve.engine_args import EngineArgs
from pdserve.serve.kv_bridge import CacheSink
from pdserve.serve.rpc import Peer
from pdserve.serve.worker_base import WorkerBase
from pdserve.serve.worker_shared import Shared
from pdserve.transfer import KVPoll, KVReceiver
from pdserve.transfer.pairing import advertised

log = logging.getLogger("pdserve.worker")
EXPIRY_EVERY_S = 0.5


class DecodeWorker(WorkerBase[DecodeScheduler]):
    role = "decode"

    def __init__(self, args: argparse.Namespace, shared: Shared | None = None) -> None:
        super().__init__(args, shared)
        self.awaiting: dict[str, tuple[int, float]] = {}  # first token came, KV awaited: (token, since)
        self.transfer_wait: dict[str, float] = {}  # KV still arriving after the first token, seconds
        self._last_expiry = 0.0
        self.receiver = KVReceiver(CacheSink(self.runner), self.transfer, host=args.host, secret=self.secret,
                                   timeout_s=self.transfer.timeout_s, transport=advertised(self.transfer.transport))
        self.kv_received = 0

    def _make_policy(self, args: argparse.Namespace, ea: EngineArgs) -> DecodeScheduler:
        return DecodeScheduler(args.cluster.decode.policy(), self.bm)

    # ---- admission --------------------------------------------------------------------------
    async def _handle_work(self, msg: m.ToWorker, peer: Peer) -> None:
        if isinstance(msg, m.Reserve):
            await peer.send(self._reserve(msg, peer))
        elif isinstance(msg, m.Generate):
            self._admit(msg, peer)
        else:
            await super()._handle_work(msg, peer)

    def _reserve(self, msg: m.Reserve, peer: Peer) -> m.Reserved:
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
        return m.Reserved(req.request_id, True, self.receiver.address(), list(req.block_ids[:n]), self.bm.block_size,
                          node_id=self.node_id)

    def _on_start(self, msg: m.Start) -> None:
        if msg.request_id in self.requests:
            self.awaiting[msg.request_id] = (msg.first_token, time.monotonic())
            self._transfer_started.set()
            self._renew(msg.request_id)  # prefill is done: the rest of its KV is on its way

    def _on_renew(self, msg: m.Renew, peer: Peer) -> None:
        if self.owners.get(msg.request_id) is peer:  # only the router connection that reserved it
            self._renew(msg.request_id)

    def _renew(self, rid: str) -> None:
        self.thread.submit(lambda: self.policy.renew(rid, self.core.clock()))

    def _abort_transfer(self, rid: str) -> None:
        self.awaiting.pop(rid, None)
        if rid in self.requests:
            self.receiver.drop(rid)

    def _forget(self, rid: str, req: Request | None) -> None:
        super()._forget(rid, req)
        self.transfer_wait.pop(rid, None)

    def _finish_timings(self, done: Request) -> dict[str, float]:
        wait = self.transfer_wait.pop(done.request_id, None)
        if wait is None:  # a short prompt run whole here
            return super()._finish_timings(done)
        return {"transfer": wait}

    # ---- the KV arriving ---------------------------------------------------------------------
    def _start_transfers(self) -> None:
        self.receiver.start()

    def _close_transfers(self) -> None:
        self.receiver.close()

    def _transfers_in_flight(self) -> bool:
        return bool(self.awaiting)

    def _poll_transfers_once(self) -> None:
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
        if time.monotonic() - self._last_expiry > EXPIRY_EVERY_S:
            self._last_expiry = time.monotonic()
            self.thread.submit(self._expire)

    def _kv_ready(self, rid: str, first: int, wait: float) -> None:
        """Engine thread: KV complete and verified; the request joins on the next step."""
        self.transfer_wait[rid] = wait
        self.kv_received += 1
        done = self.policy.remote_kv_done(rid, first, self.core.clock())
        if done is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self._finish_now, done)

    def _kv_failed(self, rid: str, err: str) -> None:
        req = self.policy.remote_kv_failed(rid, self.core.clock())
        if req is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self._error_now, rid, f"KV transfer failed: {err}", "transfer")

    def _expire(self) -> None:
        assert self.loop is not None
        for req in self.policy.expire_reservations(self.core.clock()):
            log.warning("KV reservation for %s expired: its KV never arrived and nobody released it", req.request_id)
            self.telemetry.expired.inc()
            self.loop.call_soon_threadsafe(self._error_now, req.request_id, "KV reservation expired", "transfer")

    def _error_now(self, rid: str, err: str, kind: str) -> None:
        self.receiver.drop(rid)
        super()._error_now(rid, err, kind)

    def _stats_extra(self) -> dict[str, int]:
        return {"reserved": self.policy.num_reserved, "kv_received": self.kv_received,
                "transfers_in_flight": len(self.awaiting)}
