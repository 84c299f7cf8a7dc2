"""Prefill-role policy: packed batches started by a utilization target or a maximum wait.

Lifecycle of a request on a prefill worker:
  add_request ──▶ queue (its length bucket) ──▶ batch starts when the queued tokens reach
  `target_utilization` x budget, or the oldest request has waited `max_wait_ms`, or the batch is
  full ──▶ computed (KV streamed to decode while layers finish; first token sampled)
  ──▶ transferring (blocks held until the transfer ends) ──▶ `release` frees them.
With `chunk_tokens` set, a prompt longer than that is computed `chunk_tokens` at a time over
several steps (its blocks all allocated at the start; partly computed prompts go first in every
step); the first token is sampled, and the KV sent, with the last chunk.
Batches are packed (no padding); what padding to the longest prompt would have cost is counted,
so the saving can be reported. Decode back-pressure (`set_decode_signal`, see sched/backpressure.py)
holds batches while decode is saturated and shrinks them while it fills; it never starts them sooner.
"""

from __future__ import annotations

import bisect
from collections import deque

from pdserve.config.engine import PrefillConfig
from pdserve.sched.backpressure import BackPressure, DecodeSignal
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.output import ScheduledChunk, SchedulerOutput
from pdserve.sched.request import Request, RequestStatus


class PrefillBatcher:
    """Decides when a prefill batch starts and what it holds. Pure: time comes in as `now`."""

    def __init__(self, config: PrefillConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.queues: list[deque[Request]] = [deque() for _ in range(len(config.length_buckets) + 1)]
        self.enqueued_at: dict[str, float] = {}
        self.transferring: dict[str, Request] = {}  # holding blocks: computing or sending
        self.computing: deque[Request] = deque()  # prompt partly computed (chunked)
        self.scale = 1.0
        self.pressure = BackPressure(config.min_batch_scale, config.decode_hold_ms / 1000.0)
        self.packed_tokens = 0  # tokens computed
        self.padded_tokens = 0  # tokens a padded batch would have computed

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.queues)

    @property
    def num_running(self) -> int:
        return len(self.transferring)

    @property
    def queued_tokens(self) -> int:
        return sum(r.num_prompt_tokens for q in self.queues for r in q)

    @property
    def budget(self) -> int:
        return max(1, int(self.config.max_batch_tokens * self.scale))

    def has_work(self) -> bool:
        return self.num_waiting > 0 or bool(self.computing)

    def _chunk(self, req: Request) -> int:
        n, c = req.num_uncomputed_tokens, self.config.chunk_tokens
        return n if c <= 0 else min(n, c)

    def add_request(self, req: Request, now: float) -> None:
        req.status = RequestStatus.WAITING
        self.enqueued_at[req.request_id] = now
        self.queues[bisect.bisect_left(self.config.length_buckets, req.num_prompt_tokens)].append(req)

    def set_decode_signal(self, signal: DecodeSignal | None, now: float) -> None:
        """The decode pool's load (the router's sum over every decode worker) paces the batches."""
        self.pressure.observe(signal, now)

    # ---- batching ---------------------------------------------------------------------------
    def _ready(self, q: deque[Request], now: float) -> bool:
        if not q:
            return False
        # Same arithmetic as next_wakeup, so waking at that time always finds the batch ready.
        deadline = self.enqueued_at[q[0].request_id] + self.config.max_wait_ms / 1000.0
        if now >= deadline or len(q) >= self.config.max_num_seqs:
            return True
        # The full budget's threshold: back-pressure makes batches smaller, never earlier.
        return sum(r.num_uncomputed_tokens for r in q) >= self.config.target_utilization * self.config.max_batch_tokens

    def next_wakeup(self, now: float) -> float | None:
        """When the next queued request's max-wait timer fires (None: no timer ahead).

        Asked after `schedule` found nothing to start. A timer that has already fired then means
        the batch is ready but its blocks are not free: waiting on the clock cannot help (only a
        `release` can), so it does not count; returning it would make the caller spin.
        """
        wait = self.config.max_wait_ms / 1000.0
        ahead = [d for q in self.queues if q and (d := self.enqueued_at[q[0].request_id] + wait) > now]
        pace = self.pressure.pace(now)
        if pace.holds(now) and self.has_work():
            ahead.append(pace.hold_until)  # type: ignore[arg-type]
        return min(ahead) if ahead else None

    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        pace = self.pressure.pace(now)
        self.scale = pace.scale
        budget = self.budget
        for req in self.computing:  # their blocks are held: finish them first
            n = self._chunk(req)
            if len(out.chunks) >= self.config.max_num_seqs or (out.chunks and n > budget):
                break
            out.chunks.append(ScheduledChunk(req, n, sample=n == req.num_uncomputed_tokens))
            budget -= n
        if pace.holds(now):  # decode is saturated: start nothing new, its blocks would only fill faster
            self._count(out, now)
            return out
        ready = [q for q in self.queues if self._ready(q, now)]
        if not ready:
            self._count(out, now)
            return out
        q = min(ready, key=lambda q: self.enqueued_at[q[0].request_id])
        while q and len(out.chunks) < self.config.max_num_seqs:
            req = q[0]
            if out.chunks and self._chunk(req) > budget:
                break
            self.block_manager.match_prefix(req)
            if not self.block_manager.allocate(req, req.num_uncomputed_tokens):
                self.block_manager.free(req)
                req.num_cached_tokens = 0
                break  # blocks come back as transfers finish
            q.popleft()
            del self.enqueued_at[req.request_id]
            req.status = RequestStatus.RUNNING
            req.first_scheduled_time = now
            self.transferring[req.request_id] = req
            n = self._chunk(req)
            if n < req.num_uncomputed_tokens:
                self.computing.append(req)
            out.chunks.append(ScheduledChunk(req, n, sample=n == req.num_uncomputed_tokens))
            budget -= n
        self._count(out, now)
        return out

    def _count(self, out: SchedulerOutput, now: float) -> None:
        if out.chunks:
            self.pressure.batch_started(now)
            lens = [c.num_tokens for c in out.chunks]
            self.packed_tokens += sum(lens)
            self.padded_tokens += max(lens) * len(lens)

    def update(self, out: SchedulerOutput, sampled: dict[str, int], now: float) -> list[Request]:
        """Record the computed KV and first tokens; the requests now wait for their transfers."""
        done: list[Request] = []
        for chunk in out.chunks:
            req = chunk.request
            if req.request_id not in self.transferring:
                continue  # aborted while the step ran
            req.num_computed_tokens += chunk.num_tokens
            self.block_manager.cache_full_blocks(req)
            if not chunk.sample:
                continue  # more chunks to come
            self._stop_computing(req)
            req.first_token_time = now
            req.append_token(sampled[req.request_id])
            done.append(req)
        return done

    def _stop_computing(self, req: Request) -> None:
        for i, r in enumerate(self.computing):
            if r is req:
                del self.computing[i]
                return

    def release(self, req: Request, now: float, status: RequestStatus = RequestStatus.FINISHED_STOPPED) -> None:
        """The transfer ended (either way): free the prefill-side blocks."""
        if self.transferring.pop(req.request_id, None) is not None:
            self._stop_computing(req)  # aborted mid-prompt
            self.block_manager.free(req)
            req.status = status
            req.finished_time = now

    def abort(self, request_id: str, now: float) -> Request | None:
        for q in self.queues:
            for req in q:
                if req.request_id == request_id:
                    q.remove(req)
                    del self.enqueued_at[request_id]
                    self.block_manager.free(req)
                    req.status = RequestStatus.FINISHED_ABORTED
                    req.finished_time = now
                    return req
        req = self.transferring.get(request_id)
        if req is not None:
            self.release(req, now, RequestStatus.FINISHED_ABORTED)
        return req
