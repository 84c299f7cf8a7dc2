"""The cluster behind the OpenAI front: one request's path, top to bottom.

`generate` asks the routing policy (`sched/routing.py`, the same object the simulator drives) for
the attempt's path, then:
  disagg: Reserve on the decode workers in the policy's order (refusal = back-pressure: try the
    next; all refuse: 503) ──▶ Prefill on the worker the policy picks, naming the reserved blocks
    ──▶ its first token goes to the client at once ──▶ Start on the decode worker ──▶ its tokens
    stream on.
  local: the whole request on one worker (short prompts, no usable prefill pool, failed transfers).
Each exchange with a worker is a `Call` (`worker_link.py`: a worker's connection, heartbeat and
breaker), which ends its breaker dispatch in exactly one outcome however the request ends. A late
first token may be raced by a duplicate attempt (`hedged.py`); `attempt_streams.py` bounds an
attempt by the request's deadline and watches its KV transfer.

Failures (see README, "Failure semantics"): the router remembers every token it streamed. A lost
or silent worker, or a failed KV transfer, ends that attempt; the next attempt re-prefills
prompt + tokens so far on another pair, after an exponential backoff with jitter, within a bounded
number of attempts and the request's deadline. A transfer that fails twice falls back to the
colocated path. Circuit breakers keep work away from failing workers and links; a worker that is
full or draining is overloaded, not failing, and its breaker does not count it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from pdserve.config.model import ModelShape
from pdserve.config.schema import RouterConfig  # its settings, defaults and help live in the schema
from pdserve.engine.sampler import SamplingParams
from pdserve.sched.backpressure import cluster_signal
from pdserve.sched.breaker import CircuitBreaker, Outcome
from pdserve.sched.hedge import HedgePolicy
from pdserve.sched.prefix_index import PrefixIndex
from pdserve.sched.routing import Route, RoutingPolicy, WorkerLoad, retry_backoff_s
from pdserve.serve import messages as m
from pdserve.serve.admin import PoolAdmin
from pdserve.serve.attempt_streams import watch_transfer, with_deadline
from pdserve.serve.backend import BackendError, TokenEvent
from pdserve.serve.health import cluster_health
from pdserve.serve.hedged import hedged
from pdserve.serve.tracing import Tracer
from pdserve.serve.worker_link import Call, Placement, Retryable, Worker, breaker, ending, queue_gauges

log = logging.getLogger("pdserve.router")


class ClusterBackend(PoolAdmin):
    """Implements the front's `Backend` over prefill, decode and colocated workers."""

    def __init__(self, shape: ModelShape, prefill: list[str], decode: list[str], colocated: list[str],
                 secret: bytes | None = None, config: RouterConfig | None = None,
                 policy: RoutingPolicy | None = None) -> None:
        self.shape = shape
        self.max_model_len = shape.max_model_len
        self.config = cfg = config or RouterConfig()
        self.policy = policy or RoutingPolicy(disagg_threshold=cfg.disagg_threshold, routing=cfg.routing)
        # prefix_aware: which worker caches which KV blocks, from their block-hash events
        self.index = PrefixIndex() if self.policy.routing == "prefix_aware" else None
        self.workers = ([Worker("prefill", a, secret, cfg, self.index) for a in prefill]
                        + [Worker("decode", a, secret, cfg, self.index) for a in decode]
                        + [Worker("colocated", a, secret, cfg, self.index) for a in colocated])
        self.secret = secret
        self.links: dict[tuple[str, str], CircuitBreaker] = {}  # (prefill, decode) -> breaker
        self.inflight = 0
        self.retries = 0
        self.hedge = HedgePolicy(cfg.hedge_after_ms / 1000, cfg.hedge_percentile, cfg.hedge_max_fraction)
        self.hedges = 0  # duplicate attempts sent
        self.hedge_wins = 0  # ... whose first token came first
        self.unassigned: set[str] = set()  # attempts not yet handed to a worker: the router queue
        self._poller: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self.tracer = Tracer(cfg.otlp_traces_endpoint, "pdserve-router")
        self.traceparents: dict[str, str] = {}  # request id -> its root span's context, for the workers

    def _loads(self, role: str) -> list[WorkerLoad]:
        """The policy's view of one pool, availability as of now."""
        now = time.monotonic()
        return [w.refresh_available(now) for w in self.workers if w.role == role]

    def _prefix(self, prompt: list[int], role: str) -> tuple[dict[str, int], dict[str, list[bytes]]]:
        """Per worker of a pool: prompt tokens its prefix cache holds, and the prompt's block keys as
        that worker computes them (its block size and salt); empty without prefix_aware routing.
        The last token is left out, as the worker's own lookup does (it always computes one)."""
        if self.index is None:
            return {}, {}
        return self.index.lookup(prompt, ((w.name, w.block_size, w.cache_salt) for w in self.workers
                                          if w.role == role and w.block_size > 0))

    def _placed(self, w: Worker, prompt: list[int], hits: dict[str, int], keys: dict[str, list[bytes]],
                generates: bool) -> Placement:
        """Count the prompt's uncached tokens against `w` until its first token; note in the index
        that `w` will hold the prompt's blocks (before its own report says so)."""
        if self.index is not None and w.name in keys:
            self.index.add(w.name, keys[w.name])
        return Placement(w, max(1, len(prompt) - hits.get(w.name, 0)), generates)

    def _worker(self, name: str) -> Worker:
        w = next((w for w in self.workers if w.name == name), None)
        if w is None:  # removed by its launcher while this request was being routed
            raise Retryable(f"{name} left the cluster", name)
        return w

    def _link(self, prefill: str, decode: str) -> CircuitBreaker:
        key = (prefill, decode)
        if key not in self.links:
            self.links[key] = breaker(self.config)
        return self.links[key]

    # ---- lifecycle and health ---------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.gather(*(w.heartbeat() for w in self.workers))
        self._poller = asyncio.create_task(self._poll_loop())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for w in self.workers:
            await w.client.close()
        self.tracer.shutdown()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            # Prefill workers hear the decode pool's load as of the last round (back-pressure).
            signal = cluster_signal(self._loads("decode"))
            await asyncio.gather(*(w.heartbeat(signal if w.role == "prefill" else None) for w in self.workers))

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
            "num_requests_waiting": float(sum(w.queued_prompt_tokens > 0 for w in self._loads("prefill"))),
            "kv_cache_usage": 1.0 - free / total,
            "kv_free_blocks": float(free),
            "kv_total_blocks": float(total),
            "busy_fraction": sum(w.busy_fraction for w in live) / max(1, len(live)),
            "router_queue_requests": float(len(self.unassigned)),
        }

    def worker_stats(self) -> list[tuple[str, str, dict[str, float]]]:
        """Per worker: (name, role, gauges) for the router's /metrics."""
        return [(w.name, w.role, {"up": float(w.healthy), "busy_fraction": w.busy_fraction,
                                  "kv_free_blocks": float(w.load.free_blocks), "inflight": float(w.inflight),
                                  "breaker_state": float(w.breaker.state.value), **queue_gauges(w.stats)})
                for w in self.workers]

    def worker_metrics(self) -> list[tuple[str, str, list[m.MetricFamily]]]:
        """Per worker: the counters and histograms it reported in its last heartbeat."""
        return [(w.name, w.role, w.stats.metrics) for w in self.workers if w.stats is not None]

    def link_stats(self) -> list[tuple[str, str, float]]:
        """Breaker state of every (prefill, decode) link used so far."""
        return [(p, d, float(b.state.value)) for (p, d), b in self.links.items()]

    # ---- requests ---------------------------------------------------------------------------
    def _tp(self, rid: str) -> str:
        """The traceparent of a request or of a retry of it (`rid~n`)."""
        return self.traceparents.get(rid.split("~", 1)[0], "")

    async def abort(self, request_id: str) -> None:
        for w in self.workers:
            if request_id in w.client.queues and w.client.connected:
                await w.client.send(m.Abort(request_id))

    async def generate(self, rid: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Tokens of one request, whatever fails underneath (within attempts and the deadline)."""
        cfg = self.config
        if self.inflight >= cfg.max_inflight:
            raise BackendError("the router is at capacity; retry shortly", 503, retry_after=1)
        deadline = time.monotonic() + cfg.request_timeout_s
        produced: list[int] = []
        avoid: set[str] = set()  # workers lost or silent on this request
        refused: dict[str, str] = {}  # workers in `avoid` because they refused it: their role then
        bad_kv: set[str] = set()  # decode workers a transfer to failed (still fine to run it whole)
        attempt = 0
        sub_rid = rid
        self.inflight += 1
        span = self.tracer.start_request(rid, time.monotonic())
        self.traceparents[rid] = self.tracer.traceparent(span)
        try:
            while True:
                self._forget_rejoined(avoid, refused)
                sub = dataclasses.replace(params, max_tokens=params.max_tokens - len(produced),
                                          min_tokens=max(0, params.min_tokens - len(produced)),
                                          output_offset=params.output_offset + len(produced),
                                          # the prompt's logprobs went out with the first token
                                          prompt_logprobs=params.prompt_logprobs if not produced else None)
                sub_rid = rid if attempt == 0 else f"{rid}~{attempt}"
                whole = prompt + produced
                bad = frozenset(bad_kv)

                def make(r: str, av: frozenset[str], chosen: list[str], whole: list[int] = whole,
                         sub: SamplingParams = sub, bad: frozenset[str] = bad) -> AsyncGenerator[TokenEvent, None]:
                    return self._attempt(r, whole, sub, av, bad, chosen)

                self.unassigned.add(sub_rid)
                if attempt == 0:
                    self.hedge.arrived()
                stream = (hedged(self, sub_rid, make, frozenset(avoid)) if self.hedge.enabled
                          else make(sub_rid, frozenset(avoid), []))
                try:
                    # aclosing: however this request ends (a stop string, a client gone), the
                    # attempt's Calls close now, not when the garbage collector gets to them.
                    async with aclosing(with_deadline(stream, deadline)) as events:
                        async for ev in events:
                            produced += ev.token_ids
                            if ev.finish_reason is not None and attempt:
                                ev.timings["retries"] = float(attempt)
                            yield ev
                            if ev.finish_reason is not None:
                                return
                    return
                except Retryable as e:
                    self.unassigned.discard(sub_rid)
                    attempt += 1
                    self.retries += 1
                    if e.worker:
                        (bad_kv if e.transfer else avoid).add(e.worker)
                        if not e.fault and not e.transfer:
                            refused[e.worker] = next((w.role for w in self.workers if w.name == e.worker), "")
                    now = time.monotonic()
                    if attempt >= cfg.max_attempts or now >= deadline:
                        raise BackendError(f"gave up after {attempt} attempts: {e}", 503, retry_after=1) from e
                    log.warning("request %s attempt %d failed (%s); retrying with %d tokens so far",
                                rid, attempt, e, len(produced))
                    backoff = retry_backoff_s(attempt, cfg.backoff_base_s, cfg.backoff_max_s, self._rng.random())
                    await asyncio.sleep(min(deadline - now, backoff))
        finally:
            self.inflight -= 1
            self.unassigned.discard(sub_rid)
            self.traceparents.pop(rid, None)
            self.tracer.end(span, time.monotonic())

    def _forget_rejoined(self, avoid: set[str], refused: dict[str, str]) -> None:
        """Take a worker that refused this request (draining for a role switch) off its avoid list once
        it serves in another role: otherwise a request handed back by one switching worker and then
        refused by the next finds every worker of the pool avoided, and is rejected."""
        for w in self.workers:
            if w.name in refused and w.role != refused[w.name] and w.healthy and not w.switching:
                avoid.discard(w.name)
                del refused[w.name]

    def _attempt(self, rid: str, prompt: list[int], params: SamplingParams, avoid: frozenset[str],
                 bad_kv: frozenset[str], chosen: list[str]) -> AsyncGenerator[TokenEvent, None]:
        """One attempt's stream, on the path the policy picks (BackendError at once if none);
        the worker that computes the prompt is appended to `chosen`."""
        local_role = "colocated" if any(w.role == "colocated" for w in self.workers) else "decode"
        hits, keys = self._prefix(prompt, local_role)
        route = self.policy.route(len(prompt), self._loads("prefill"), self._loads("decode"),
                                  self._loads("colocated"), avoid, bad_kv, hits)
        if route.path == "reject":
            if route.status == 503 and any(w.switching for w in self.workers):  # short only while it switches
                raise Retryable(f"{route.reason} (a worker is switching roles)", fault=False)
            raise BackendError(route.reason, route.status, retry_after=1)
        if route.path == "local":
            chosen.append(route.worker)
            return self._local(rid, prompt, params, self._worker(route.worker), hits, keys)
        return self._disagg(rid, prompt, params, route, avoid, chosen)

    async def _local(self, rid: str, prompt: list[int], params: SamplingParams, w: Worker,
                     hits: dict[str, int], keys: dict[str, list[bytes]]) -> AsyncGenerator[TokenEvent, None]:
        """The whole request on one worker (colocated, or a decode worker running the prefill)."""
        t0 = time.monotonic()
        with w.call(rid) as c, self._placed(w, prompt, hits, keys, generates=True) as placed:
            w.load.running += 1
            await c.send(m.Generate(rid, prompt, m.Params.of(params), traceparent=self._tp(rid)))
            self.unassigned.discard(rid)
            t_sent = time.monotonic()
            self.tracer.record("router_queue", self._tp(rid), t0, t_sent, worker=w.name)
            timeout = self.config.first_token_timeout_s
            while True:
                ev = await c.next(timeout)
                placed.first_token()
                timeout = self.config.token_timeout_s
                if c.done:
                    ev.timings = {"router_queue": t_sent - t0, **ev.timings}
                yield ev
                if c.done:
                    return

    async def _reserve(self, rid: str, prompt: list[int], params: SamplingParams, route: Route
                       ) -> tuple[Call, m.Reserved]:
        """Reserve KV on the first decode worker in the route's order that can hold the request;
        returns that worker's open Call (the caller closes it). While every one is full the request
        waits here, up to `reserve_wait_s`, re-trying after each load report: held back from
        prefill, not answered 503 at once (the queue is bounded by `max_inflight`)."""
        give_up = time.monotonic() + self.config.reserve_wait_s
        order = route.decode
        while True:
            got = await self._reserve_once(rid, prompt, params, order)
            if got is not None:
                return got
            if time.monotonic() + self.config.stats_interval_s > give_up:
                break
            await asyncio.sleep(self.config.stats_interval_s * (0.5 + self._rng.random()))
            fresh = tuple(w.name for w in self.policy.rank_decode(self._loads("decode")) if w.name in route.decode)
            order = fresh or order
        refused = self.policy.refused()
        raise BackendError(refused.reason, refused.status, retry_after=1)

    async def _reserve_once(self, rid: str, prompt: list[int], params: SamplingParams, order: tuple[str, ...]
                            ) -> tuple[Call, m.Reserved] | None:
        """One pass over `order`: the first worker's Call and reply that reserved, else None."""
        for name in order:
            c = self._worker(name).call(rid)
            try:
                await c.send(m.Reserve(rid, prompt, m.Params.of(params), traceparent=self._tp(rid)))
                reply = await c.reply(self.config.reserve_timeout_s)
            except Retryable as e:
                c.close(e)  # lost or silent: a fault; a late "yes" is aborted; try the next
                continue
            except BaseException as e:
                c.close(e)  # the client left while the Reserve was on its way: abort a late "yes"
                raise
            if isinstance(reply, m.Reserved) and reply.ok:
                c.answered = True
                return c, reply
            c.done = isinstance(reply, m.Reserved)  # a refusal holds nothing
            c.close()  # full is overload, not a fault: neutral
            if isinstance(reply, m.Reserved) and reply.reason.startswith("invalid:"):
                raise BackendError(f"{c.worker.name}: {reply.reason.removeprefix('invalid:').strip()}", 400)
        return None

    async def _disagg(self, rid: str, prompt: list[int], params: SamplingParams, route: Route,
                      avoid: frozenset[str], chosen: list[str]) -> AsyncGenerator[TokenEvent, None]:
        """Reserve on decode, prefill (first token streamed at once), then decode streams on."""
        t0 = time.monotonic()
        dc, res = await self._reserve(rid, prompt, params, route)
        reserve = time.monotonic() - t0  # part of router_queue: the decode round trip before the Prefill
        with dc, Placement(dc.worker, 0, generates=True) as generating:
            d = dc.worker
            d.load.free_blocks -= len(res.block_ids)
            d.load.running += 1
            generating.first_token()  # from its reservation on, the request weighs on the decode worker
            prefill = self._loads("prefill")
            bad_links = frozenset(w.name for w in prefill if not self._link(w.name, d.name).allow(t0))
            hits, keys = self._prefix(prompt, "prefill")
            pick = self.policy.prefill_for(d.name, prefill, avoid, bad_links, len(prompt), hits)
            if isinstance(pick, Route):
                raise BackendError(pick.reason, pick.status, retry_after=1)
            p = self._worker(pick)
            chosen.append(p.name)
            streamed = False  # the decode worker produced tokens: the KV crossed the link

            def transfer_failed(e: BaseException) -> bool:
                return isinstance(e, Retryable) and e.transfer

            with p.call(rid) as pc, ending(self._link(p.name, d.name).dispatch(t0), lambda: streamed,
                                           transfer_failed), self._placed(p, prompt, hits, keys, False) as placed:
                pc.on_progress = lambda: dc.send(m.Renew(rid))  # a long prefill keeps its decode reservation
                p.load.queued_prompt_tokens += len(prompt)
                await pc.send(m.Prefill(rid, prompt, m.Params.of(params), res.kv_address, res.block_ids,
                                        res.block_size, cluster_signal(self._loads("decode")), kv_node=res.node_id,
                                        decode_worker=d.name, traceparent=self._tp(rid)))
                self.unassigned.discard(rid)
                queued = time.monotonic() - t0
                self.tracer.record("router_queue", self._tp(rid), t0, t0 + queued, prefill=p.name, decode=d.name)
                ev = await pc.next(self.config.first_token_timeout_s)
                placed.first_token()
                pc.dispatch.end(Outcome.SUCCESS, time.monotonic())  # the prefill worker did its part
                prefill_timings = {"router_reserve": reserve, **ev.timings}
                if pc.done:  # the first token already ended it; the reservation is dropped on exit
                    ev.timings = {"router_queue": queued, **prefill_timings}
                    yield ev
                    return
                yield ev
                watcher = asyncio.create_task(watch_transfer(pc.queue, dc.queue, rid))
                try:
                    await dc.send(m.Start(rid, ev.token_ids[0]))
                    while True:
                        ev = await dc.next(self.config.token_timeout_s)
                        streamed = True
                        if dc.done:
                            ev.timings = {"router_queue": queued, **prefill_timings, **ev.timings}
                            pc.done = True  # the prefill worker released it once the KV was sent
                        yield ev
                        if dc.done:
                            return
                finally:
                    watcher.cancel()
