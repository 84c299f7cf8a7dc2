"""The cluster behind the OpenAI front: pick a (prefill, decode) pair, reserve, prefill, stream.

Per request: Reserve on the decode worker with the most free KV (refusal = back-pressure: try the
next, then 503) ──▶ Prefill on the prefill worker with the fewest queued prompt tokens, naming the
reserved blocks ──▶ its first token goes to the client at once ──▶ Start on the decode worker ──▶
its tokens stream on. Prompts shorter than `disagg_threshold` (and clusters without prefill
workers) are served whole by a colocated worker, or else by a decode worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pdserve.config.model import ModelShape
from pdserve.engine.sampler import SamplingParams
from pdserve.sched.routing import WorkerLoad, pick_colocated, pick_prefill, rank_decode
from pdserve.serve import messages as m
from pdserve.serve.backend import BackendError, TokenEvent
from pdserve.serve.rpc import RpcClient

log = logging.getLogger("pdserve.router")


@dataclass
class RouterConfig:
    disagg_threshold: int = 0  # prompts shorter than this skip the prefill pool
    reserve_timeout_s: float = 2.0
    first_token_timeout_s: float = 120.0
    stats_interval_s: float = 0.1


class WorkerLost(BackendError):
    """The connection to a worker broke while it held the request."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 503, retry_after=1)


class Worker:
    """The router's view of one worker: its connection and its load."""

    def __init__(self, role: str, address: str, secret: bytes | None) -> None:
        self.role = role
        self.client = RpcClient(address, secret)
        self.load = WorkerLoad(name=f"{role}@{address}", available=False)
        self.inflight = 0  # requests this router has on it
        self.busy_fraction = 0.0

    @property
    def name(self) -> str:
        return self.load.name


class ClusterBackend:
    """Implements the front's `Backend` over prefill, decode and colocated workers."""

    def __init__(self, shape: ModelShape, prefill: list[str], decode: list[str], colocated: list[str],
                 secret: bytes | None = None, config: RouterConfig | None = None) -> None:
        self.shape = shape
        self.max_model_len = shape.max_model_len
        self.config = config or RouterConfig()
        self.workers = ([Worker("prefill", a, secret) for a in prefill]
                        + [Worker("decode", a, secret) for a in decode]
                        + [Worker("colocated", a, secret) for a in colocated])
        self._nonce = itertools.count()
        self._poller: asyncio.Task[None] | None = None

    def _pool(self, role: str) -> list[Worker]:
        return [w for w in self.workers if w.role == role]

    # ---- lifecycle and health ---------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.gather(*(self._refresh(w) for w in self.workers))
        self._poller = asyncio.create_task(self._poll_loop())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for w in self.workers:
            await w.client.close()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            await asyncio.gather(*(self._refresh(w) for w in self.workers))

    async def _refresh(self, w: Worker) -> None:
        """Ask a worker for its load; an unreachable or silent worker leaves the pool."""
        nonce = f"stats-{next(self._nonce)}"
        q = w.client.open(nonce)
        try:
            await w.client.send(m.StatsQuery(nonce))
            s = await asyncio.wait_for(q.get(), timeout=2.0)
            if not isinstance(s, m.Stats):
                raise ConnectionError("connection lost")
            w.load.queued_prompt_tokens = s.queued_prompt_tokens
            w.load.free_blocks, w.load.total_blocks = s.free_blocks, s.total_blocks
            w.load.running = s.running + s.reserved + s.waiting
            w.busy_fraction = s.busy_fraction
            if not w.load.available and not s.draining:
                log.info("%s joined", w.name)
            w.load.available = not s.draining
        except (TimeoutError, OSError, ConnectionError) as e:
            if w.load.available:
                log.warning("%s left the pool: %s", w.name, e or type(e).__name__)
            w.load.available = False
        finally:
            w.client.close_queue(nonce)

    def stats(self) -> dict[str, float]:
        kv = [w for w in self.workers if w.role != "prefill" and w.load.available]
        free = sum(w.load.free_blocks for w in kv)
        total = sum(w.load.total_blocks for w in kv) or 1
        live = [w for w in self.workers if w.load.available]
        return {
            "num_requests_running": float(sum(w.inflight for w in self.workers)),
            "num_requests_waiting": float(sum(w.load.queued_prompt_tokens > 0 for w in self._pool("prefill"))),
            "kv_cache_usage": 1.0 - free / total,
            "kv_free_blocks": float(free),
            "kv_total_blocks": float(total),
            "busy_fraction": sum(w.busy_fraction for w in live) / max(1, len(live)),
        }

    def worker_stats(self) -> list[tuple[str, str, dict[str, float]]]:
        """Per worker: (name, role, gauges) for the router's /metrics."""
        return [(w.name, w.role, {"up": float(w.load.available), "busy_fraction": w.busy_fraction,
                                  "kv_free_blocks": float(w.load.free_blocks),
                                  "inflight": float(w.inflight)}) for w in self.workers]

    # ---- requests ---------------------------------------------------------------------------
    async def abort(self, request_id: str) -> None:
        for w in self.workers:
            if request_id in w.client.queues and w.client.connected:
                await w.client.send(m.Abort(request_id))

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
                 ) -> AsyncIterator[TokenEvent]:
        return self._generate(request_id, prompt_token_ids, params)

    async def _generate(self, rid: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        t0 = time.monotonic()
        prefill_pool = [w.load for w in self._pool("prefill")]
        short = len(prompt) < self.config.disagg_threshold
        if short or pick_prefill(prefill_pool) is None:
            stream = self._local(rid, prompt, params, t0)
        else:
            stream = self._disagg(rid, prompt, params, t0)
        async for ev in stream:
            yield ev

    async def _local(self, rid: str, prompt: list[int], params: SamplingParams, t0: float
                     ) -> AsyncIterator[TokenEvent]:
        pool = self._pool("colocated") or self._pool("decode")
        pick = pick_colocated([w.load for w in pool])
        if pick is None:
            raise BackendError("no worker is available", 503, retry_after=1)
        w = next(w for w in pool if w.load is pick)
        q = w.client.open(rid)
        w.inflight += 1
        w.load.running += 1
        done = False
        try:
            await w.client.send(m.Generate(rid, prompt, m.Params.of(params)))
            queued = time.monotonic() - t0
            while True:
                msg = await q.get()
                ev = _event(msg, w)
                if ev.finish_reason is not None:
                    ev.timings = {"router_queue": queued, **ev.timings}
                    done = True
                yield ev
                if done:
                    return
        finally:
            w.inflight -= 1
            w.client.close_queue(rid)
            if not done and w.client.connected:
                await w.client.send(m.Abort(rid))

    async def _reserve(self, rid: str, prompt: list[int], params: SamplingParams
                       ) -> tuple[Worker, m.Reserved]:
        decode = self._pool("decode")
        for load in rank_decode([w.load for w in decode]):
            w = next(w for w in decode if w.load is load)
            q = w.client.open(rid)
            try:
                await w.client.send(m.Reserve(rid, prompt, m.Params.of(params)))
                reply = await asyncio.wait_for(q.get(), self.config.reserve_timeout_s)
            except (TimeoutError, OSError, ConnectionError):
                reply = None
            if isinstance(reply, m.Reserved) and reply.ok:
                w.load.free_blocks -= len(reply.block_ids)
                w.load.running += 1
                return w, reply
            w.client.close_queue(rid)
            if isinstance(reply, m.Reserved) and "outside" in reply.reason:
                raise BackendError(reply.reason, 400)
        raise BackendError("every decode worker is full; retry shortly", 503, retry_after=1)

    async def _disagg(self, rid: str, prompt: list[int], params: SamplingParams, t0: float
                      ) -> AsyncIterator[TokenEvent]:
        d, res = await self._reserve(rid, prompt, params)
        dq = d.client.queues[rid]
        pick = pick_prefill([w.load for w in self._pool("prefill")])
        if pick is None:
            d.client.close_queue(rid)
            await d.client.send(m.Abort(rid))
            raise BackendError("no prefill worker is available", 503, retry_after=1)
        p = next(w for w in self._pool("prefill") if w.load is pick)
        pq = p.client.open(rid)
        finished = False
        d.inflight += 1
        p.inflight += 1
        p.load.queued_prompt_tokens += len(prompt)
        try:
            await p.client.send(m.Prefill(rid, prompt, m.Params.of(params), res.kv_address, res.block_ids,
                                          res.block_size, d.load.free_fraction))
            queued = time.monotonic() - t0
            first = await asyncio.wait_for(pq.get(), self.config.first_token_timeout_s)
            ev = _event(first, p)
            prefill_timings = dict(ev.timings)
            if ev.finish_reason is not None:
                ev.timings = {"router_queue": queued, **prefill_timings}
                finished = True
                yield ev
                return
            yield ev
            await d.client.send(m.Start(rid, ev.token_ids[0]))
            while True:
                ev = _event(await dq.get(), d)
                if ev.finish_reason is not None:
                    ev.timings = {"router_queue": queued, **prefill_timings, **ev.timings}
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            d.inflight -= 1
            p.inflight -= 1
            p.client.close_queue(rid)
            d.client.close_queue(rid)
            if not finished:  # client gone or a failure: free everything, everywhere
                for w in (p, d):
                    if w.client.connected:
                        await w.client.send(m.Abort(rid))


def _event(msg: m.ToRouter | None, w: Worker) -> TokenEvent:
    if msg is None:
        raise WorkerLost(f"lost the connection to {w.name}")
    if isinstance(msg, m.TransferDone | m.Reserved | m.Stats):
        return TokenEvent([])  # not a token message: nothing to show
    if msg.error is not None:
        raise BackendError(f"{w.name}: {msg.error}", 500)
    return TokenEvent(list(msg.token_ids), msg.finish_reason, timings=dict(msg.timings),
                      num_cached_tokens=msg.num_cached_tokens)
