"""The prefill role: batched prefill whose KV is pushed, layer by layer, into a decode worker's blocks.

Prefill(prompt, decode's KV address and blocks) ──▶ queue ──▶ batch ──▶ each layer's KV is pushed
to the decode worker as soon as the layer is computed ──▶ Tokens(first token) to the router at
once ──▶ TransferDone when every layer is acknowledged (or the transfer failed); then the
request's blocks are freed. Draining waits for transfers in flight as well as for requests.
Until its first token, a request held here is reported as progressing (`Progress`, paced by
sched/progress.py) after steps: the router renews its decode reservation, and does not take a
long prompt or a long queue for a silent worker.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from collections import Counter

import msgspec

from pdserve.engine.core import StepResult
from pdserve.sched.backpressure import DecodeSignal
from pdserve.sched.prefill import PrefillBatcher
from pdserve.sched.progress import ProgressPacer, progress_interval
from pdserve.sched.request import Request
from pdserve.serve import messages as m
from pdserve.serve.engine_args import EngineArgs
from pdserve.serve.kv_bridge import KVPush
from pdserve.serve.rpc import Peer
from pdserve.serve.telemetry import overlap_share
from pdserve.serve.worker_base import WorkerBase, first_token_finish, prefill_timings, send_all
from pdserve.serve.worker_shared import Shared
from pdserve.transfer import KVPoll, KVSender, faults
from pdserve.transfer.pairing import pair_address, scheme


class PrefillWorker(WorkerBase[PrefillBatcher]):
    role = "prefill"

    def __init__(self, args: argparse.Namespace, shared: Shared | None = None) -> None:
        super().__init__(args, shared)
        self.kv_dest: dict[str, m.Prefill] = {}  # where each request's KV goes
        self.sending: dict[str, float] = {}  # requests whose transfer is in flight, since when
        self.kv_sent: Counter[str] = Counter()  # completed transfers by transport
        self.xfer: dict[str, list[float]] = {}  # for the metrics: [first layer queued, last layer queued, bytes]
        self.chunks_seen: dict[str, int] = {}  # the sender's chunk count per destination, as last counted
        self.sender = KVSender(self.transfer, secret=self.secret, timeout_s=self.transfer.timeout_s)
        faults.install_from_config(self.sender, self.transfer)  # fault tests only
        self.core.layer_hook = self._push_layer
        self.kv_push = KVPush(self.runner)  # cuda: side-stream copies into pinned buffers, no engine-thread sync
        c = args.cluster
        self.progress = ProgressPacer(progress_interval(c.decode.reservation_timeout_s, c.router.first_token_timeout_s))

    def _make_policy(self, args: argparse.Namespace, ea: EngineArgs) -> PrefillBatcher:
        return PrefillBatcher(args.cluster.prefill.policy(), self.bm)

    # ---- admission --------------------------------------------------------------------------
    async def _handle_work(self, msg: m.ToWorker, peer: Peer) -> None:
        if isinstance(msg, m.Prefill):
            if self._admit(msg, peer):
                kv = pair_address(msg.kv_address, self.transfer.transport, self.node_id, msg.kv_node)
                self.kv_dest[msg.request_id] = msgspec.structs.replace(msg, kv_address=kv)
                self.progress.arrived(msg.request_id, time.monotonic())
                self._decode_signal(msg.decode)
        else:
            await super()._handle_work(msg, peer)

    async def _handle(self, msg: m.ToWorker, peer: Peer) -> None:
        if isinstance(msg, m.StatsQuery) and msg.decode is not None:
            self._decode_signal(msg.decode)  # the heartbeat carries it even when no Prefill comes
        await super()._handle(msg, peer)

    def _decode_signal(self, signal: DecodeSignal | None) -> None:
        self.thread.submit(lambda: self.policy.set_decode_signal(signal, self.core.clock()))

    def _forget(self, rid: str, req: Request | None) -> None:
        super()._forget(rid, req)
        self.kv_dest.pop(rid, None)
        self.xfer.pop(rid, None)
        self.progress.forget(rid)

    def _dispatch(self, result: StepResult) -> None:
        """After a step: its tokens, then a `Progress` for each held request that is due one."""
        super()._dispatch(result)
        out: dict[Peer, list[m.Progress]] = {}
        for rid in self.progress.due(time.monotonic()):
            peer = self.owners.get(rid)
            if peer is not None:
                out.setdefault(peer, []).append(m.Progress(rid))
        for peer, msgs in out.items():
            asyncio.ensure_future(send_all(peer, msgs))

    def _abort_transfer(self, rid: str) -> None:
        if rid in self.sending:
            self.sender.abort(rid)

    # ---- the first token and the KV ----------------------------------------------------------
    def _on_token(self, req: Request, tok: int, done: Request | None) -> m.Tokens:
        """The one token a prefill makes goes to the router now; the request lives on until its KV is sent."""
        reason = first_token_finish(req, tok)
        self.progress.forget(req.request_id)
        self.telemetry.cache_queries.inc(req.num_prompt_tokens)
        self.telemetry.cache_hits.inc(req.num_cached_tokens)
        if self.tracer.enabled:
            self._trace_prefill(req, self.traceparents.get(req.request_id, ""))
        self.sending[req.request_id] = time.monotonic()
        self._transfer_started.set()
        return m.Tokens(req.request_id, [tok], reason, timings=prefill_timings(req),
                        num_cached_tokens=req.num_cached_tokens)

    def _push_layer(self, out, layer: int) -> None:  # type: ignore[no-untyped-def]
        """Engine thread: layer `layer` of this batch is computed; ship it."""
        for chunk in out.chunks:
            req = chunk.request
            dest = self.kv_dest.get(req.request_id)
            if dest is None or not chunk.sample:
                continue  # a prompt's earlier chunks: its KV goes with the last one, all blocks
            n = self.bm.blocks_needed(req.num_prompt_tokens)
            now = time.monotonic()
            x = self.xfer.setdefault(req.request_id, [now, now, 0.0])
            cache = self.runner.kv_caches[layer]  # [2, blocks, ...]: K and V of n blocks leave
            x[1], x[2] = now, x[2] + 2 * n * cache[0, 0].numel() * cache.element_size()
            self.kv_push.push(layer, req.block_ids[:n], functools.partial(
                self.sender.send_layer, req.request_id, dest.kv_address, layer, self.runner.shape.num_layers,
                dest.block_ids[:n]))

    def _transfers_in_flight(self) -> bool:
        return bool(self.sending)

    def _busy(self) -> bool:
        return bool(self.sending)

    def _handed_back(self) -> list[str]:
        """A switch waits for KV pushes under way (their decode worker is waiting on them)."""
        return [rid for rid in self.requests if rid not in self.sending]

    def _poll_transfers_once(self) -> None:
        for rid, started in list(self.sending.items()):
            try:
                state = self.sender.poll(rid)
            except KeyError:
                state = KVPoll.FAILED if rid not in self.requests else KVPoll.BOOTSTRAPPING
            if state not in (KVPoll.SUCCESS, KVPoll.FAILED):
                continue
            del self.sending[rid]
            dest = self.kv_dest.get(rid)
            if state is KVPoll.SUCCESS and dest is not None:
                self.kv_sent[scheme(dest.kv_address)] += 1
            self._record_transfer(rid, state is KVPoll.SUCCESS)
            req = self.requests.get(rid)
            peer = self.owners.get(rid)
            if peer is not None:
                asyncio.ensure_future(send_all(peer, [m.TransferDone(
                    rid, state is KVPoll.SUCCESS, time.monotonic() - started, self.sender.error(rid))]))
            if req is not None:
                self.thread.submit(lambda req=req: self.policy.release(req, self.core.clock()))
            self._forget(rid, req)

    def _record_transfer(self, rid: str, ok: bool) -> None:
        """Metrics of a transfer that ended: its bytes, time and overlap with compute, or why it failed."""
        dest = self.kv_dest.get(rid)
        x = self.xfer.pop(rid, None)
        if dest is None:
            return
        pair = (dest.decode_worker or dest.kv_address, dest.kv_address.partition("://")[0])
        t = self.telemetry
        t.pair_seen(*pair)
        if not ok:
            t.transfer_failed(*pair, self.sender.error(rid))
        elif x is not None:
            now = time.monotonic()
            t.transfer_bytes.labels(*pair).inc(x[2])
            t.transfer_seconds.labels(*pair).observe(now - x[0])
            t.transfer_overlap.labels(*pair).observe(overlap_share(x[0], now, x[1]))
            self.tracer.record("transfer", self.traceparents.get(rid, ""), x[0], now, bytes=int(x[2]),
                               decode=pair[0], transport=pair[1])
        sent = self.sender.chunks_sent.get(dest.kv_address, 0)
        t.transfer_chunks.labels(*pair).inc(sent - self.chunks_seen.get(dest.kv_address, 0))
        self.chunks_seen[dest.kv_address] = sent

    def _close_transfers(self) -> None:
        self.kv_push.close()  # deliver queued layers first
        self.sender.close()

    def _stats_extra(self) -> dict[str, int]:
        return {"queued_prompt_tokens": self.policy.queued_tokens, "kv_sent_tcp": self.kv_sent["tcp"],
                "kv_sent_shm": self.kv_sent["shm"], "transfers_in_flight": len(self.sending)}
