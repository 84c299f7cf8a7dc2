"""Colocated policy: continuous batching with chunked prefill under a per-step token budget.

This is the Sarathi-Serve recipe, the strongest monolithic baseline:
  1. every running request that is decoding gets its one token (oldest first);
  2. running requests part-way through a prefill get the next chunk;
  3. waiting requests are admitted in arrival order while budget, sequence slots and blocks last.
When a block cannot be found, the newest running request is preempted by recompute: its blocks are
freed and it goes back to the front of the queue, to be prefilled again (prompt + tokens so far).
"""

from __future__ import annotations

from collections import deque
from itertools import accumulate

from pdserve.config.engine import SchedulerConfig
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.output import ScheduledChunk, SchedulerOutput
from pdserve.sched.request import Request, RequestStatus


class ColocatedScheduler:
    """Decides what one colocated instance computes each step. Pure: time comes in as `now`."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- queue ------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, req: Request, now: float) -> None:
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str, now: float) -> Request | None:
        """Stop a request wherever it is and free its blocks."""
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED, now)

    def finish(self, request_id: str, status: RequestStatus, now: float) -> Request | None:
        """End a request for a reason found outside the policy (stop string, abort, error)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req, status, now)
        return req

    def _release(self, req: Request, status: RequestStatus, now: float) -> None:
        self.block_manager.free(req)
        req.status = status
        req.finished_time = now

    def running_limit(self) -> int:
        """How many sequences may run at once (the decode role adapts this)."""
        return self.config.max_num_seqs

    # ---- one step ---------------------------------------------------------------------------
    # `schedule` and `update` run once per engine step (and per simulated step, millions of times on
    # a long trace), so token counts are read straight from the request's lists here rather than
    # through its chains of properties; the arithmetic is the same.
    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        chunks = out.chunks
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        bm = self.block_manager
        bs = bm.block_size
        running_status = RequestStatus.RUNNING
        # Decodes first, then prefill chunks; within each, oldest admission first. (A copy: running
        # shrinks when a request is preempted during the loop.)
        running = self.running
        order = [r for r in running
                 if len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens <= 1]
        if len(order) != len(running):
            order += [r for r in running
                      if len(r.prompt_token_ids) + len(r.output_token_ids) - r.num_computed_tokens > 1]
        for req in order:
            if budget <= 0:
                break
            if req.status is not running_status:
                continue  # preempted earlier in this step
            computed = req.num_computed_tokens
            left = len(req.prompt_token_ids) + len(req.output_token_ids) - computed
            n = left if left <= budget else (budget if chunked else 0)
            if n == 0:
                continue
            # A new block is needed only when the chunk crosses the last block's end.
            if -(-(computed + n) // bs) > len(req.block_ids) and not self._allocate_or_preempt(req, n, out):
                continue
            chunks.append(ScheduledChunk(req, n, n == left))
            budget -= n
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        if out.preempted:
            return out  # memory is tight: admit nothing new this step
        waiting = self.waiting
        while waiting and budget > 0 and len(running) < self.running_limit():
            req = waiting[0]
            if not req.block_ids:
                bm.match_prefix(req)
            left = len(req.prompt_token_ids) + len(req.output_token_ids) - req.num_computed_tokens
            n = left if left <= budget else (budget if chunked else 0)
            if n == 0 or not bm.allocate(req, n):
                if req.num_cached_tokens:
                    bm.free(req)  # don't pin cached blocks while queued
                    req.num_cached_tokens = 0
                break
            waiting.popleft()
            req.status = running_status
            running.append(req)
            chunks.append(ScheduledChunk(req, n, n == left))
            budget -= n
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        return out

    def _allocate_or_preempt(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        scheduled: set[str] | None = None
        while not self.block_manager.allocate(req, n):
            if scheduled is None:  # the requests already given a chunk this step are not victims
                scheduled = {c.request.request_id for c in out.chunks}
            victim = next(
                (r for r in reversed(self.running) if r is not req and r.request_id not in scheduled),
                None,
            )
            self._preempt(victim or req)
            out.preempted.append(victim or req)
            if victim is None:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.block_manager.free(req)
        req.num_cached_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput, sampled: dict[str, int], now: float) -> list[Request]:
        """Apply a step's results; return the requests that finished."""
        finished: list[Request] = []
        running_status = RequestStatus.RUNNING
        bm = self.block_manager
        caching = bm.enable_prefix_caching  # cache_full_blocks does nothing without it
        for chunk in out.chunks:
            req = chunk.request
            if req.status is not running_status:
                continue  # aborted while the step ran
            req.num_computed_tokens += chunk.num_tokens
            if caching:
                bm.cache_full_blocks(req)
            if not chunk.sample:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            status = req.append_token(sampled[req.request_id])
            if status is not None:
                del self.requests[req.request_id]
                self._release(req, status, now)
                finished.append(req)
        if finished:
            # One pass instead of a list.remove per finished request (order is kept).
            if len(finished) == 1:
                self.running.remove(finished[0])
            else:
                done = set(finished)
                self.running[:] = [r for r in self.running if r not in done]
        return finished

    # ---- many decode steps at once -----------------------------------------------------------
    # A simulator spends nearly all its time in steps where nothing can be decided: every running
    # request decodes one token, nothing waits, nobody finishes. These two methods let it apply a
    # run of such steps in one call; the result is the same state, to the block id, as calling
    # schedule/update once per step (tests/test_sched_decode_run.py checks that).
    def decode_run_length(self, token: int, limit: int) -> int:
        """How many next steps (<= limit) are certain to be one decode token per running request.

        Certain means: nothing waits to be admitted, every running request is decoding (has
        sampled a token and has KV for all before it), none finishes before the last of these
        steps (the last may: it is the step where the first request reaches max_tokens) and every
        block they need is free (so nothing is preempted).
        `token` is what each step samples; if it could stop a request the answer is 0.
        The steps before the last can be applied with `advance_decode`; the last one, which may
        finish requests, goes through schedule/update.
        """
        running = self.running
        if self.waiting or not running or len(running) > self.config.max_num_batched_tokens:
            return 0
        k = limit
        for r in running:
            out = r.output_token_ids
            # (A request with no token yet is finishing its prompt: its step samples a first token.)
            if (len(r.prompt_token_ids) + len(out) - r.num_computed_tokens != 1 or not out
                    or token in r.stop_token_ids):
                return 0
            left = r.max_tokens - len(out)
            if left < k:
                k = left
        if k <= 0:
            return 0
        bm = self.block_manager
        free, bs = bm.num_free_blocks, bm.block_size

        def need(steps: int) -> int:
            return sum(max(0, -(-(r.num_computed_tokens + steps) // bs) - len(r.block_ids)) for r in running)

        if need(k) <= free:
            return k
        lo, hi = 0, k  # need(lo) <= free < need(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if need(mid) <= free else (lo, mid)
        return lo

    def advance_decode(self, token: int, step_ends: list[float], start: float) -> None:
        """Apply len(step_ends) steps, all before the last that `decode_run_length` vouched for,
        as schedule/update would.

        Step m runs from step_ends[m - 1] (`start` for the first) to step_ends[m].
        """
        k = len(step_ends)
        bm = self.block_manager
        bs = bm.block_size
        caching = bm.enable_prefix_caching
        # schedule() takes a block at the step whose token starts one; update() publishes a block
        # once it is full. Replay both in the order the step-by-step calls make them:
        # by step, allocations before publications, running order within each.
        events: list[tuple[int, int, int]] = []
        base = []
        for idx, r in enumerate(self.running):
            c = r.num_computed_tokens
            base.append(c)
            events.extend((m, 0, idx) for m in self._new_block_steps(r, k))
            if caching:
                events.extend((m, 1, idx) for m in range(-(c + 1) % bs, k, bs))
            r.output_token_ids.extend([token] * k)
        events.sort()
        running = self.running
        if not caching:
            bm.append_block_each([running[idx] for _, _, idx in events])
        else:
            for m, phase, idx in events:
                r = running[idx]
                if phase == 0:
                    bm.allocate_tokens(r, base[idx] + m + 1)
                else:
                    r.num_computed_tokens = base[idx] + m + 1
                    bm.cache_full_blocks(r)
        for r, c in zip(self.running, base, strict=True):
            r.num_computed_tokens = c + k

    def decode_run_blocks(self, steps: int) -> list[int]:
        """For each step of a run: the blocks schedule() has taken once it has started (cumulative)."""
        taken = [0] * steps
        for r in self.running:
            for m in self._new_block_steps(r, steps):
                taken[m] += 1
        return list(accumulate(taken))

    def _new_block_steps(self, req: Request, steps: int) -> range:
        """The steps of a run (from 0) at whose start schedule() gives `req` a new block."""
        bs = self.block_manager.block_size
        # the first step whose token falls past the request's last block, then every block_size
        return range(max(len(req.block_ids) * bs - req.num_computed_tokens, 0), steps, bs)

    def next_wakeup(self, now: float) -> float | None:
        """Continuous batching has no timers: it runs whenever it has work."""
        return None
