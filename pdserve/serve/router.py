"""The cluster behind the OpenAI front: pick a (prefill, decode) pair, reserve, prefill, stream.

Per request: Reserve on the decode worker with the most free KV (refusal = back-pressure: try the
next, then 503) ──▶ Prefill on the prefill worker with the fewest queued prompt tokens, naming the
reserved blocks ──▶ its first token goes to the client at once ──▶ Start on the decode worker ──▶
its tokens stream on. Prompts shorter than `disagg_threshold` (and clusters without prefill
workers) are served whole by a colocated worker, or else by a decode worker.

Failures (see README, "Failure semantics"): the router remembers every token it streamed. A lost
or silent worker, or a failed KV transfer, ends that attempt; the next attempt re-prefills
prompt + tokens so far on another pair, after an exponential backoff with jitter, within a bounded
number of attempts and the request's deadline. A transfer that fails twice falls back to the
colocated path. Circuit breakers keep work away from failing workers and links.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pdserve.config.model import ModelShape
from pdserve.engine.sampler import SamplingParams
from pdserve.sched.breaker import CircuitBreaker
from pdserve.sched.routing import pick_colocated, pick_prefill, rank_decode
from pdserve.serve import messages as m
from pdserve.serve.backend import BackendError, TokenEvent
from pdserve.serve.health import cluster_health
from pdserve.serve.worker_link import Retryable, Worker, event, get, send, watch_transfer, with_deadline

log = logging.getLogger("pdserve.router")


@dataclass
class RouterConfig:
    disagg_threshold: int = 0  # prompts shorter than this skip the prefill pool
    reserve_timeout_s: float = 2.0
    first_token_timeout_s: float = 60.0  # prefill silent this long: try elsewhere
    token_timeout_s: float = 30.0  # decode silent this long mid-stream: try elsewhere
    request_timeout_s: float = 600.0  # overall deadline of one request
    max_attempts: int = 4
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0
    max_inflight: int = 512  # requests in the router at once; beyond: 503 at once
    stats_interval_s: float = 0.1
    breaker_failures: int = 3
    breaker_reset_s: float = 5.0


class ClusterBackend:
    """Implements the front's `Backend` over prefill, decode and colocated workers."""

    def __init__(self, shape: ModelShape, prefill: list[str], decode: list[str], colocated: list[str],
                 secret: bytes | None = None, config: RouterConfig | None = None) -> None:
        self.shape = shape
        self.max_model_len = shape.max_model_len
        self.config = cfg = config or RouterConfig()
        self.workers = ([Worker("prefill", a, secret, cfg) for a in prefill]
                        + [Worker("decode", a, secret, cfg) for a in decode]
                        + [Worker("colocated", a, secret, cfg) for a in colocated])
        self.secret = secret
        self.links: dict[tuple[str, str], CircuitBreaker] = {}  # (prefill, decode) -> breaker
        self.inflight = 0
        self.retries = 0
        self._nonce = itertools.count()
        self._poller: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self._cleanup: set[asyncio.Future[None]] = set()  # abort sends in flight

    def _pool(self, role: str) -> list[Worker]:
        now = time.monotonic()
        pool = [w for w in self.workers if w.role == role]
        for w in pool:
            w.refresh_available(now)
        return pool

    def _link(self, p: Worker, d: Worker) -> CircuitBreaker:
        key = (p.name, d.name)
        if key not in self.links:
            self.links[key] = CircuitBreaker(self.config.breaker_failures, self.config.breaker_reset_s)
        return self.links[key]

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
        """Heartbeat: ask a worker for its load; an unreachable or silent one leaves the pool."""
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
            if not w.healthy and not s.draining:
                log.info("%s joined the pool", w.name)
            w.healthy, w.draining = not s.draining, s.draining
        except (TimeoutError, OSError, ConnectionError) as e:
            if w.healthy:
                log.warning("%s left the pool: %s", w.name, e or type(e).__name__)
            w.healthy = w.draining = False
        finally:
            w.client.close_queue(nonce)

    def health(self) -> tuple[bool, dict[str, object]]:
        """For /health: can the cluster serve now, and if not, why (see serve/health.py)."""
        return cluster_health(self.workers)

    def stats(self) -> dict[str, float]:
        kv = [w for w in self.workers if w.role != "prefill" and w.healthy]
        free = sum(w.load.free_blocks for w in kv)
        total = sum(w.load.total_blocks for w in kv) or 1
        live = [w for w in self.workers if w.healthy]
        return {
            "num_requests_running": float(self.inflight),
            "num_requests_waiting": float(sum(w.load.queued_prompt_tokens > 0 for w in self._pool("prefill"))),
            "kv_cache_usage": 1.0 - free / total,
            "kv_free_blocks": float(free),
            "kv_total_blocks": float(total),
            "busy_fraction": sum(w.busy_fraction for w in live) / max(1, len(live)),
        }

    def worker_stats(self) -> list[tuple[str, str, dict[str, float]]]:
        """Per worker: (name, role, gauges) for the router's /metrics."""
        return [(w.name, w.role, {"up": float(w.healthy), "busy_fraction": w.busy_fraction,
                                  "kv_free_blocks": float(w.load.free_blocks), "inflight": float(w.inflight),
                                  "breaker_state": float(w.breaker.state.value)}) for w in self.workers]

    async def add_worker(self, role: str, address: str) -> str:
        """A worker started after the router joins the pool (it needs the cluster secret)."""
        if role not in ("prefill", "decode", "colocated"):
            raise ValueError("role must be prefill, decode or colocated")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("address must be host:port")
        existing = next((w for w in self.workers if w.role == role and w.client.address == address), None)
        if existing is None:
            existing = Worker(role, address, self.secret, self.config)
            self.workers.append(existing)
        await self._refresh(existing)
        return existing.name

    def link_stats(self) -> list[tuple[str, str, float]]:
        """Breaker state of every (prefill, decode) link used so far."""
        return [(p, d, float(b.state.value)) for (p, d), b in self.links.items()]

    # ---- requests ---------------------------------------------------------------------------
    def _abort_on(self, workers: list[Worker], rid: str) -> None:
        """Tell workers to drop a request, in a task of its own: this runs in `finally` blocks of
        requests being cancelled (client gone), where an awaited send could itself be cancelled
        half-way and leave blocks held."""
        async def send() -> None:
            for w in workers:
                if w.client.connected:
                    try:
                        await w.client.send(m.Abort(rid))
                    except (OSError, ConnectionError):
                        pass  # the worker is gone, and its blocks with it

        task = asyncio.ensure_future(send())
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    async def abort(self, request_id: str) -> None:
        for w in self.workers:
            if request_id in w.client.queues and w.client.connected:
                await w.client.send(m.Abort(request_id))

    async def generate(self, rid: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Tokens of one request, whatever fails underneath (within attempts and the deadline)."""
        cfg = self.config
        if self.inflight >= cfg.max_inflight:
            raise BackendError("the router is at capacity; retry shortly", 503, retry_after=1)
        t0 = time.monotonic()
        deadline = t0 + cfg.request_timeout_s
        produced: list[int] = []
        avoid: set[str] = set()  # workers lost or silent on this request
        bad_kv: set[str] = set()  # decode workers a transfer to failed (still fine to run it whole)
        attempt = 0
        self.inflight += 1
        try:
            while True:
                sub = dataclasses.replace(params, max_tokens=params.max_tokens - len(produced),
                                          min_tokens=max(0, params.min_tokens - len(produced)))
                sub_rid = rid if attempt == 0 else f"{rid}~{attempt}"
                no_kv_dest = rank_decode([w.load for w in self._pool("decode")], frozenset(avoid | bad_kv)) == []
                local = (len(prompt) < cfg.disagg_threshold or len(bad_kv) >= 2 or no_kv_dest
                         or pick_prefill([w.load for w in self._pool("prefill")], frozenset(avoid)) is None)
                stream = (self._local(sub_rid, prompt + produced, sub, avoid) if local
                          else self._disagg(sub_rid, prompt + produced, sub, avoid | bad_kv))
                try:
                    async for ev in with_deadline(stream, deadline):
                        produced += ev.token_ids
                        if ev.finish_reason is not None and attempt:
                            ev.timings["retries"] = float(attempt)
                        yield ev
                        if ev.finish_reason is not None:
                            return
                    return
                except Retryable as e:
                    attempt += 1
                    self.retries += 1
                    if e.worker:
                        (bad_kv if e.transfer else avoid).add(e.worker)
                    now = time.monotonic()
                    if attempt >= cfg.max_attempts or now >= deadline:
                        raise BackendError(f"gave up after {attempt} attempts: {e}", 503, retry_after=1) from e
                    log.warning("request %s attempt %d failed (%s); retrying with %d tokens so far",
                                rid, attempt, e, len(produced))
                    backoff = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempt - 1))
                    await asyncio.sleep(min(deadline - now, backoff * (0.5 + self._rng.random())))
        finally:
            self.inflight -= 1

    async def _local(self, rid: str, prompt: list[int], params: SamplingParams, avoid: set[str]
                     ) -> AsyncIterator[TokenEvent]:
        pool = self._pool("colocated") or self._pool("decode")
        pick = pick_colocated([w.load for w in pool], frozenset(avoid))
        if pick is None:
            raise BackendError("no worker is available", 503, retry_after=1)
        w = next(w for w in pool if w.load is pick)
        q = w.client.open(rid)
        w.inflight += 1
        w.load.running += 1
        w.breaker.on_dispatch()
        done = False
        t0 = time.monotonic()
        try:
            await send(w, m.Generate(rid, prompt, m.Params.of(params)))
            t_sent = time.monotonic()
            timeout = self.config.first_token_timeout_s
            while True:
                ev = event(await get(q, w, timeout), w)
                timeout = self.config.token_timeout_s
                done = ev.finish_reason is not None
                if done:
                    ev.timings = {"router_queue": t_sent - t0, **ev.timings}
                    w.breaker.record_success(time.monotonic())
                yield ev
                if done:
                    return
        except Retryable:
            w.breaker.record_failure(time.monotonic())
            raise
        finally:
            w.inflight -= 1
            w.client.close_queue(rid)
            if not done:
                self._abort_on([w], rid)

    async def _reserve(self, rid: str, prompt: list[int], params: SamplingParams, avoid: set[str]
                       ) -> tuple[Worker, m.Reserved]:
        decode = self._pool("decode")
        for load in rank_decode([w.load for w in decode], frozenset(avoid)):
            w = next(w for w in decode if w.load is load)
            q = w.client.open(rid)
            try:
                await send(w, m.Reserve(rid, prompt, m.Params.of(params)))
                reply = await get(q, w, self.config.reserve_timeout_s)
            except Retryable:
                w.breaker.record_failure(time.monotonic())
                reply = None
            except asyncio.CancelledError:
                # The client left while the reservation was on its way: its "yes" may still come,
                # and nothing else would free those blocks before the reservation timeout.
                w.client.close_queue(rid)
                self._abort_on([w], rid)
                raise
            if isinstance(reply, m.Reserved) and reply.ok:
                w.load.free_blocks -= len(reply.block_ids)
                w.load.running += 1
                return w, reply
            w.client.close_queue(rid)
            if reply is None:
                self._abort_on([w], rid)  # a late "yes" must not leave blocks held
            if isinstance(reply, m.Reserved) and reply.reason.startswith("invalid:"):
                raise BackendError(f"{w.name}: {reply.reason.removeprefix('invalid:').strip()}", 400)
        raise BackendError("every decode worker is full; retry shortly", 503, retry_after=1)

    async def _disagg(self, rid: str, prompt: list[int], params: SamplingParams, avoid: set[str]
                      ) -> AsyncIterator[TokenEvent]:
        t0 = time.monotonic()
        d, res = await self._reserve(rid, prompt, params, avoid)
        dq = d.client.queues[rid]
        prefill = self._pool("prefill")
        ok_links = frozenset(avoid | {w.name for w in prefill if not self._link(w, d).allow(t0)})
        pick = pick_prefill([w.load for w in prefill], ok_links) or pick_prefill([w.load for w in prefill],
                                                                                  frozenset(avoid))
        if pick is None:
            d.client.close_queue(rid)
            self._abort_on([d], rid)
            raise BackendError("no prefill worker is available", 503, retry_after=1)
        p = next(w for w in prefill if w.load is pick)
        link = self._link(p, d)
        pq = p.client.open(rid)
        finished = False
        d.inflight += 1
        p.inflight += 1
        p.load.queued_prompt_tokens += len(prompt)
        for b in (p.breaker, d.breaker, link):
            b.on_dispatch()
        stage = p
        watcher: asyncio.Task[None] | None = None
        try:
            await send(p, m.Prefill(rid, prompt, m.Params.of(params), res.kv_address, res.block_ids,
                                     res.block_size, d.load.free_fraction))
            queued = time.monotonic() - t0
            ev = event(await get(pq, p, self.config.first_token_timeout_s), p)
            p.breaker.record_success(time.monotonic())
            prefill_timings = dict(ev.timings)
            if ev.finish_reason is not None:  # the first token already ended it
                ev.timings = {"router_queue": queued, **prefill_timings}
                finished = True
                self._abort_on([d], rid)  # the decode worker's reservation is not needed
                yield ev
                return
            yield ev
            stage = d
            watcher = asyncio.create_task(watch_transfer(rid, pq, dq))
            await send(d, m.Start(rid, ev.token_ids[0]))
            while True:
                ev = event(await get(dq, d, self.config.token_timeout_s), d)
                if ev.finish_reason is not None:
                    ev.timings = {"router_queue": queued, **prefill_timings, **ev.timings}
                    finished = True
                    for b in (d.breaker, link):
                        b.record_success(time.monotonic())
                yield ev
                if finished:
                    return
        except Retryable as e:
            now = time.monotonic()
            (link if e.transfer else stage.breaker).record_failure(now)
            if e.transfer:
                raise Retryable(str(e), d.name, transfer=True) from e
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            d.inflight -= 1
            p.inflight -= 1
            p.client.close_queue(rid)
            d.client.close_queue(rid)
            if not finished:  # client gone or a failure: free everything, everywhere
                self._abort_on([p, d], rid)
