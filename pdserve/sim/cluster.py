"""The simulated cluster: router, instances (real `sched/` policies), KV transfers, request records.

The router's decisions are the real router's `RoutingPolicy` (sched/routing.py), called with the
instances' loads as the router would see them:
  arrival ──▶ policy.route: the decode instances to try, in order (most free blocks, fewest
      running); each is asked to reserve KV in turn; none can ──▶ rejected (the real router's 503),
      counted in `SimResult.num_rejected`, never queued
  ──▶ policy.prefill_for: the prefill instance with the fewest queued prompt tokens; its
      PrefillBatcher batches it
  ──▶ prefill step ends: first token streamed (TTFT), KV transfer starts (the part not already
      streamed layer by layer during the step)
  ──▶ transfer lands: DecodeScheduler.remote_kv_done, PrefillBatcher.release
  ──▶ DecodeScheduler continuous batching until max_tokens.
Colocated: arrival ──▶ policy.route picks the instance with the least work (prompt tokens still
  to compute, generating sequences weighted) ──▶ ColocatedScheduler until done.
The loads the policy sees are the router's own live counts, kept here as the router keeps them
(`WorkerLoad.pending_tokens`, `decoding`). With prompts given to `run` (real token ids) and
prefix_aware routing, the instances' block managers publish their block-hash events into a
`PrefixIndex` as the real workers do, and the policy scores instances by cached prefix.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from pdserve.config.model import ModelShape
from pdserve.sched.backpressure import cluster_signal
from pdserve.sched.output import SchedulerOutput
from pdserve.sched.prefix_index import PrefixIndex
from pdserve.sched.request import Request
from pdserve.sched.routing import RoutingPolicy, WorkerLoad
from pdserve.sim.events import EventLoop
from pdserve.sim.hardware import Link
from pdserve.sim.instance import SimInstance
from pdserve.sim.network import Network
from pdserve.workload import RequestSpec


@dataclass
class SimResult:
    """Raw per-request times (seconds, NaN when missing) and per-instance / per-port statistics."""

    arrival: list[float]
    prompt: list[int]
    output: list[int]
    first_token: list[float]
    finish: list[float]
    itls: array
    duration: float
    wall_s: float
    num_events: int
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    ports: dict[str, dict[str, float]] = field(default_factory=dict)
    num_preemptions: int = 0
    num_rejected: int = 0  # refused at the router (503): no decode instance could reserve KV
    max_itl: list[float] = field(default_factory=list)  # each request's worst gap (NaN: < 2 tokens)


class Simulator:
    """Drives a list of SimInstances (all colocated, or prefill + decode) through a request list."""

    def __init__(self, instances: list[SimInstance], shape: ModelShape, link: Link,
                 layerwise: bool = True, runs: bool = True, request_overhead_s: float = 0.0,
                 routing: RoutingPolicy | None = None, reserve_wait_s: float = 0.0,
                 stats_interval_s: float = 0.1) -> None:
        """runs=False: one event per step everywhere (slower; the same results, see instance.py).

        request_overhead_s: serving time outside the steps (HTTP, router, RPC), added to each
        request's way in; its arrival time, and so its TTFT and E2E, still count from the client.
        routing: the router's policy (default: the real router's; a simulated decode instance
        cannot serve a whole request, so `decode_serves_whole` is off).
        reserve_wait_s, stats_interval_s: as the router's: a request every decode instance refuses
        waits, re-trying once per load report, this long before it is rejected.
        """
        self.reserve_wait_s = reserve_wait_s
        self.stats_interval_s = stats_interval_s
        self.instances = instances
        self.prefill = [i for i in instances if i.role == "prefill"]
        self.decode = [i for i in instances if i.role == "decode"]
        self.colocated = [i for i in instances if i.role == "colocated"]
        if self.colocated and (self.prefill or self.decode):
            raise ValueError("a cluster is either colocated or prefill + decode, not both")
        if bool(self.prefill) != bool(self.decode) or not instances:
            raise ValueError("a disaggregated cluster needs at least one prefill and one decode instance")
        self.shape = shape
        self.link = link
        self.layerwise = layerwise
        self.request_overhead_s = request_overhead_s
        self.loop = EventLoop()
        self.net = Network(self.loop)
        self.kv_bytes_per_token = shape.kv_bytes_per_token()
        for inst in instances:
            inst.attach(self.loop, self._on_step, self._on_run if runs else None)
        self.routing = routing or RoutingPolicy(decode_serves_whole=False)
        self._by_name = {inst.name: inst for inst in instances}
        self._loads = {inst.name: WorkerLoad(inst.name) for inst in instances}  # the router's view
        self._pairs: dict[int, tuple[SimInstance, SimInstance, Request]] = {}
        self._beating = False  # the heartbeat to prefill instances is scheduled
        self.index = PrefixIndex() if self.routing.routing == "prefix_aware" else None
        self._placed: dict[int, tuple[str, int]] = {}  # request -> (instance, pending tokens) until its first token
        if self.index is not None:
            for inst in instances:
                inst.policy.block_manager.record_events()

    # ---- arrivals and routing ----------------------------------------------------------------
    def _arrive(self, now: float, i: int) -> None:
        if i + 1 < len(self.specs):
            self.loop.at(self.specs[i + 1].arrival_s + self.request_overhead_s, self._arrive, i + 1)
        hits, keys = self._prefix(i, self.colocated)
        route = self.routing.route(self.specs[i].prompt_tokens, self._view(self.prefill, now),
                                   self._view(self.decode, now), self._view(self.colocated, now), hits=hits)
        if route.path == "local":
            inst = self._by_name[route.worker]
            if inst.role != "colocated":
                raise ValueError(f"the routing policy sent a whole request to {inst.name}, which cannot serve one")
            self._place(i, inst, hits, keys)
            inst.sync(now)
            inst.policy.add_request(self._new_request(i, now), now)
            inst.kick(now)
            return
        if route.path == "disagg":
            self._try_disagg(now, i, route.decode, now + self.reserve_wait_s)
        elif route.path == "reject":
            self.num_rejected += 1

    def _try_disagg(self, now: float, i: int, order: tuple[str, ...], give_up: float) -> None:
        if self._disagg(i, order, now):
            return
        if now + self.stats_interval_s <= give_up:  # the router waits for room, as `_reserve` does
            self.loop.at(now + self.stats_interval_s, self._retry_disagg, i, order, give_up)
            return
        self.routing.refused()  # every decode instance refused: what the router answers
        self.num_rejected += 1

    def _retry_disagg(self, now: float, i: int, order: tuple[str, ...], give_up: float) -> None:
        """A retry, as `_reserve`'s: in the order of the loads reported now, among the route's."""
        fresh = tuple(w.name for w in self.routing.rank_decode(self._view(self.decode, now)) if w.name in order)
        self._try_disagg(now, i, fresh or order, give_up)

    def _view(self, insts: list[SimInstance], now: float) -> list[WorkerLoad]:
        """The loads the router sees (its own counts, and reports as `Stats` would give them),
        without touching a run."""
        out = []
        for inst in insts:
            w = self._loads[inst.name]
            if inst.role == "prefill":
                w.queued_prompt_tokens = inst.outstanding_tokens
            elif inst.role == "decode":
                w.free_blocks, w.total_blocks = inst.free_blocks(now), inst.policy.block_manager.num_blocks
                w.running = inst.policy.num_running
                w.reserved, w.waiting = inst.policy.num_reserved, inst.policy.num_waiting
            else:
                w.running = inst.policy.num_waiting + inst.policy.num_running
            out.append(w)
        return out

    def _prefix(self, i: int, insts: list[SimInstance]) -> tuple[dict[str, int], dict[str, list[bytes]]]:
        """Per instance: cached prompt tokens and the prompt's block keys (prefix_aware with prompts)."""
        if self.index is None or self.prompts is None:
            return {}, {}
        for inst in insts:  # the reports, as if every heartbeat were now
            self.index.apply(inst.name, *inst.policy.block_manager.take_events())
        return self.index.lookup(self.prompts[i], ((inst.name, inst.policy.block_manager.block_size,
                                                    inst.policy.block_manager.salt) for inst in insts))

    def _place(self, i: int, inst: SimInstance, hits: dict[str, int], keys: dict[str, list[bytes]]) -> None:
        """The router's own count: the prompt's uncached tokens weigh on `inst` until its first token."""
        if self.index is not None and inst.name in keys:
            self.index.add(inst.name, keys[inst.name])
        n = max(1, self.specs[i].prompt_tokens - hits.get(inst.name, 0))
        self._loads[inst.name].pending_tokens += n
        self._placed[i] = (inst.name, n)

    def _first_token(self, i: int) -> None:
        placed = self._placed.pop(i, None)
        if placed is not None:
            w = self._loads[placed[0]]
            w.pending_tokens -= placed[1]
            if self._by_name[placed[0]].role == "colocated":
                w.decoding += 1
                self._generating[i] = placed[0]

    def _new_request(self, i: int, now: float) -> Request:
        s = self.specs[i]
        # payload: the request's index, so per-token bookkeeping needs no int(request_id).
        prompt = self.prompts[i] if self.prompts is not None else [0] * s.prompt_tokens
        return Request(str(i), prompt, s.output_tokens, now, payload=i)

    def _disagg(self, i: int, order: tuple[str, ...], now: float) -> bool:
        """Reserve on the first decode instance in `order` that can, then queue the prefill on the
        policy's pick; False if none can reserve (the request is rejected)."""
        dreq = self._new_request(i, now)
        dec = None
        for name in order:
            d = self._by_name[name]
            d.sync(now)
            ok = d.policy.reserve(dreq, now)
            d.resume()
            if ok:
                dec = d
                break
        if dec is None:
            return False
        self._loads[dec.name].decoding += 1
        self._generating[i] = dec.name
        hits, keys = self._prefix(i, self.prefill)
        pick = self.routing.prefill_for(dec.name, self._view(self.prefill, now),
                                        prompt_tokens=self.specs[i].prompt_tokens, hits=hits)
        if not isinstance(pick, str):
            raise AssertionError("a simulated prefill instance is always available")
        pre = self._by_name[pick]
        self._place(i, pre, hits, keys)
        preq = self._new_request(i, now)
        self._pairs[i] = (pre, dec, dreq)
        pre.outstanding_tokens += preq.num_prompt_tokens
        pre.policy.add_request(preq, now)
        self._signal_prefill(now)  # the Prefill message carries the signal
        if not self._beating:
            self._beating = True
            self.loop.at(now + self.stats_interval_s, self._heartbeat)
        return True

    def _signal_prefill(self, now: float) -> None:
        """The decode pool's load, as the router sums it, to every prefill instance."""
        signal = cluster_signal(self._view(self.decode, now))
        for pre in self.prefill:
            pre.policy.set_decode_signal(signal, now)
            pre.kick(now)

    def _heartbeat(self, now: float) -> None:
        """The router's heartbeat, every `stats_interval_s` while prefill has work queued."""
        self._signal_prefill(now)
        if any(p.policy.has_work() for p in self.prefill):
            self.loop.at(now + self.stats_interval_s, self._heartbeat)
        else:
            self._beating = False

    # ---- step results ------------------------------------------------------------------------
    def _token(self, i: int, n: int, now: float) -> None:
        if n <= self.seen[i]:
            return
        if self.seen[i] == 0:
            self.first_token[i] = now
            self._first_token(i)
        else:
            gap = now - self.last_token[i]
            self.itls.append(gap)
            if not gap <= self.max_gap[i]:
                self.max_gap[i] = gap
        self.last_token[i] = now
        self.seen[i] = n

    def _on_step(self, inst: SimInstance, out: SchedulerOutput, finished: list[Request], now: float) -> None:
        if inst.role == "prefill":
            for req in finished:
                self._prefilled(inst, req, out, now)
            return
        seen, last, itls, worst = self.seen, self.last_token, self.itls, self.max_gap
        for c in out.chunks:
            if c.sample:  # self._token, inlined: this runs for every generated token
                req = c.request
                i, n = req.payload, len(req.output_token_ids)
                if n <= seen[i]:
                    continue
                if seen[i] == 0:
                    self.first_token[i] = now
                    self._first_token(i)
                else:
                    gap = now - last[i]
                    itls.append(gap)
                    if not gap <= worst[i]:  # (NaN before the second token)
                        worst[i] = gap
                last[i] = now
                seen[i] = n
        bm = inst.policy.block_manager
        used = bm.num_blocks - bm.num_free_blocks
        if used > inst.kv_peak_blocks:
            inst.kv_peak_blocks = used
        for req in finished:
            self._finished(req, now)

    def _on_run(self, inst: SimInstance, reqs: list[Request], ends: list[float]) -> None:
        """A run of decode steps was applied: every request got one token at each of `ends`."""
        seen, last, itls, worst = self.seen, self.last_token, self.itls, self.max_gap
        gaps = array("d", [b - a for a, b in zip(ends, ends[1:], strict=False)])
        run_worst = max(gaps, default=0.0)
        first = ends[0]
        for req in reqs:
            i = req.payload
            gap = first - last[i]  # every request here has streamed a token before
            itls.append(gap)
            itls.extend(gaps)
            gap = gap if gap > run_worst else run_worst
            if not gap <= worst[i]:
                worst[i] = gap
            last[i] = ends[-1]
            seen[i] = len(req.output_token_ids)

    def _finished(self, req: Request, now: float) -> None:
        i = req.payload
        self._done(i)
        self.finish[i] = now
        self.num_finished += 1
        req.prompt_token_ids = []  # the policy is done with it; keep memory flat on long traces

    def _prefilled(self, pre: SimInstance, req: Request, out: SchedulerOutput, now: float) -> None:
        i = req.payload
        pre.outstanding_tokens -= req.num_prompt_tokens
        self._token(i, 1, now)  # the first token streams from the prefill worker at once
        _, dec, _ = self._pairs[i]
        nbytes = req.num_prompt_tokens * self.kv_bytes_per_token
        if self.layerwise:
            # Layers 1..L-1 went out while the step ran, as far as this transfer's share allowed.
            step = now - (req.first_scheduled_time or now)
            sent = min(nbytes * (self.shape.num_layers - 1) / self.shape.num_layers,
                       min(pre.port.share(), dec.port.share()) * step)
            pre.port.bytes_moved += sent
            dec.port.bytes_moved += sent
            nbytes -= sent
        self.net.start(pre.port, dec.port, nbytes, self.link.latency_s,
                       lambda t, i=i, req=req: self._transferred(t, i, req), now)

    def _transferred(self, now: float, i: int, preq: Request) -> None:
        pre, dec, _ = self._pairs.pop(i)
        dec.sync(now)
        done = dec.policy.remote_kv_done(str(i), 0, now)
        pre.policy.release(preq, now)
        if done is not None:  # max_tokens == 1: the first token was the last
            self._done(i)
            self.finish[i] = self.first_token[i]
            self.num_finished += 1
        dec.kick(now)
        pre.kick(now)

    def _done(self, i: int) -> None:
        name = self._generating.pop(i, None)
        if name is not None:
            self._loads[name].decoding -= 1

    # ---- run ---------------------------------------------------------------------------------
    def run(self, specs: list[RequestSpec], progress: bool = False,
            prompts: list[list[int]] | None = None) -> SimResult:
        """prompts: real token ids per spec (e.g. `bench.prefix_prompts`), so prefix caches can hit
        (give the instances block managers with prefix caching on); default all zeros."""
        self.specs = specs
        self.prompts = prompts
        self._generating: dict[int, str] = {}
        n = len(specs)
        nan = float("nan")
        self.seen = [0] * n
        self.first_token = [nan] * n
        self.last_token = [nan] * n
        self.max_gap = [nan] * n
        self.finish = [nan] * n
        self.itls = array("d")
        self.num_finished = 0
        self.num_rejected = 0
        start = time.perf_counter()
        if specs:
            self.loop.at(specs[0].arrival_s + self.request_overhead_s, self._arrive, 0)
        bar = _progress(self, n) if progress else None
        self.loop.run(on_event=bar)
        if bar is not None:
            bar.close()  # type: ignore[attr-defined]
        end = max((t for t in self.finish if t == t), default=0.0)
        t0 = specs[0].arrival_s if specs else 0.0
        duration = max(end - t0, 1e-9)
        return SimResult(
            arrival=[s.arrival_s for s in specs], prompt=[s.prompt_tokens for s in specs],
            output=[s.output_tokens for s in specs], first_token=self.first_token, finish=self.finish,
            itls=self.itls, duration=duration, wall_s=time.perf_counter() - start,
            num_events=self.loop.num_events,
            instances={x.name: x.stats(duration) for x in self.instances},
            ports={x.name: x.port.utilization(duration) for x in self.instances if x.role != "colocated"},
            num_preemptions=sum(getattr(x.policy, "num_preemptions", 0) for x in self.instances),
            num_rejected=self.num_rejected, max_itl=self.max_gap,
        )


class _progress:
    """A tqdm bar over finished requests, refreshed every 4,096 events (cheap on long runs)."""

    def __init__(self, sim: Simulator, total: int) -> None:
        from tqdm import tqdm

        self.sim, self.k, self.done = sim, 0, 0
        self.bar = tqdm(total=total, unit="req", desc="sim", mininterval=0.5)

    def __call__(self) -> None:
        self.k += 1
        if self.k & 4095 == 0:
            done = self.sim.num_finished
            self.bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        self.bar.close()
