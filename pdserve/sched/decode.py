"""Decode-role policy: reservations for remote KV, then continuous batching.

Lifecycle of a request on a decode worker:
  reserve ──▶ WAITING_FOR_REMOTE_KV (blocks held; prefill streams KV into them)
          ──▶ remote_kv_done: KV complete and verified, first token known ──▶ waiting (ready)
          ──▶ admitted on the next step ──▶ RUNNING (one token per step) ──▶ FINISHED_*
  A reservation that fails or expires frees its blocks; it expires `reservation_timeout_s` after
  it was made or last renewed, and its prefill renews it while it makes progress (a long prompt,
  a long prefill queue), so only a prefill that died or went silent lets it run out. A reservation
  refused at once is the back-pressure signal. Short prompts may skip prefill workers: `add_request` runs the prefill
  here, in chunks, like the colocated policy; preempted requests are recomputed the same way.
"""

from __future__ import annotations

from pdserve.config.engine import DecodeConfig, SchedulerConfig
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.colocated import ColocatedScheduler
from pdserve.sched.output import SchedulerOutput
from pdserve.sched.request import Request, RequestStatus


class DecodeScheduler(ColocatedScheduler):
    """Continuous batching over sequences whose KV arrived from a prefill worker."""

    def __init__(self, config: DecodeConfig, block_manager: BlockManager) -> None:
        super().__init__(
            SchedulerConfig(
                max_num_batched_tokens=max(config.max_num_batched_tokens, config.max_batch_size),
                max_num_seqs=config.max_batch_size,
            ),
            block_manager,
        )
        self.decode_config = config
        self.reserved: dict[str, tuple[Request, float]] = {}  # id -> (request, deadline)
        # Fitted step time t = a + b * batch, for the adaptive batch size (from observed steps).
        self._step_obs: list[tuple[int, float]] = []
        self._last_step: tuple[float, int] | None = None
        # Free blocks new reservations leave untouched while sequences run (see `reserve`).
        self.watermark = max(1, block_manager.num_blocks // 100)

    @property
    def num_reserved(self) -> int:
        return len(self.reserved)

    # ---- reservations -----------------------------------------------------------------------
    def reserve(self, req: Request, now: float) -> bool:
        """Hold blocks for the prompt's KV (+ the first token). Answers at once; False = full.

        Refused while a preempted request waits to be recomputed: new reservations would take the
        blocks it needs, and under steady load it would starve (the decode stall). While sequences
        run (or wait to run) here, `watermark` blocks stay free for them to grow into.
        """
        if len(self.requests) + len(self.reserved) >= self.decode_config.max_num_seqs:
            return False
        preempted = RequestStatus.PREEMPTED
        if any(r.status is preempted for r in self.waiting):
            return False
        bm = self.block_manager
        if self.running or self.waiting:
            need = bm.blocks_needed(req.num_prompt_tokens + 1) - len(req.block_ids)
            if bm.num_free_blocks - need < self.watermark:
                return False
        req.num_computed_tokens = 0
        if not bm.allocate(req, req.num_prompt_tokens + 1):
            return False
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.reserved[req.request_id] = (req, now + self.decode_config.reservation_timeout_s)
        return True

    def renew(self, request_id: str, now: float) -> bool:
        """The reserved request's prefill made progress: its reservation now lasts until
        `reservation_timeout_s` after `now` (never shorter than it was). False if it holds none."""
        entry = self.reserved.get(request_id)
        if entry is None:
            return False
        req, deadline = entry
        self.reserved[request_id] = (req, max(deadline, now + self.decode_config.reservation_timeout_s))
        return True

    def remote_kv_done(self, request_id: str, first_token: int, now: float) -> Request | None:
        """KV for the whole prompt is in place: the request joins on the next step.

        Returns the request if the first token already finished it (max_tokens=1, a stop token).
        """
        entry = self.reserved.pop(request_id, None)
        if entry is None:
            return None
        req = entry[0]
        req.num_computed_tokens = req.num_prompt_tokens
        self.block_manager.cache_full_blocks(req)
        req.first_token_time = now
        status = req.append_token(first_token)
        if status is not None:
            self._release(req, status, now)
            return req
        req.status = RequestStatus.WAITING
        self.requests[request_id] = req
        self.waiting.append(req)
        return None

    def remote_kv_failed(self, request_id: str, now: float) -> Request | None:
        """The transfer failed or was cut: free the reservation; the router decides what next."""
        entry = self.reserved.pop(request_id, None)
        if entry is None:
            return None
        self._release(entry[0], RequestStatus.FINISHED_ERROR, now)
        return entry[0]

    def expire_reservations(self, now: float) -> list[Request]:
        """Free reservations whose KV never arrived in time."""
        late = [rid for rid, (_, deadline) in self.reserved.items() if deadline <= now]
        return [r for rid in late if (r := self.remote_kv_failed(rid, now)) is not None]

    def abort(self, request_id: str, now: float) -> Request | None:
        entry = self.reserved.pop(request_id, None)
        if entry is not None:
            self._release(entry[0], RequestStatus.FINISHED_ABORTED, now)
            return entry[0]
        return super().abort(request_id, now)

    def _ready_before_recompute(self) -> None:
        """Requests whose KV arrived go ahead of preempted ones waiting to be recomputed.

        A ready request holds its blocks while it waits; a preempted one needs blocks anew. With
        the preempted one first, it can wait for blocks that only the ready ones behind it would
        free by running, forever (it preempts itself each time it outgrows what is left). Reservations
        are refused while it waits, so the ready ones drain and it gets the memory.
        """
        waiting = self.waiting
        if len(waiting) < 2 or waiting[0].status is not RequestStatus.PREEMPTED:
            return
        ready = [r for r in waiting if r.status is not RequestStatus.PREEMPTED]
        if ready:
            rest = [r for r in waiting if r.status is RequestStatus.PREEMPTED]
            waiting.clear()
            waiting.extend(ready + rest)

    # ---- adaptive batch size ----------------------------------------------------------------
    def running_limit(self) -> int:
        cfg = self.decode_config
        if not cfg.adaptive_batch:
            return cfg.max_batch_size
        # Grow with the queue: everything running or ready, at least min_batch_size...
        want = max(cfg.min_batch_size, len(self.running) + len(self.waiting))
        # ...but no larger than the step time allowed by the TPOT target.
        if cfg.tpot_target_ms > 0 and len(self._step_obs) >= 2:
            a, b = self._fit()
            if b > 0:
                want = min(want, int((cfg.tpot_target_ms / 1000.0 - a) / b))
        return max(cfg.min_batch_size, min(cfg.max_batch_size, want))

    def _fit(self) -> tuple[float, float]:
        xs = [x for x, _ in self._step_obs]
        ys = [y for _, y in self._step_obs]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if var == 0:
            return my, 0.0
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
        return my - b * mx, b

    def schedule(self, now: float) -> SchedulerOutput:
        self._ready_before_recompute()
        out = super().schedule(now)
        # A pure decode step (every chunk one sampled token) is an observation for the fit.
        n = len(out.chunks)
        self._last_step = (now, n) if n and out.num_decode_seqs == n else None
        return out

    def advance_decode(self, token: int, step_ends: list[float], start: float) -> None:
        super().advance_decode(token, step_ends, start)
        # The observations schedule/update would have made (only the latest 64 are kept).
        batch, k = len(self.running), len(step_ends)
        self._last_step = (step_ends[-2] if k > 1 else start, batch)
        if not self.decode_config.adaptive_batch:
            return
        first = max(0, k - 64)
        prev = step_ends[first - 1] if first else start
        obs = self._step_obs
        for end in step_ends[first:]:
            obs.append((batch, end - prev))
            prev = end
        if len(obs) > 64:
            del obs[: len(obs) - 64]

    def update(self, out: SchedulerOutput, sampled: dict[str, int], now: float) -> list[Request]:
        if self._last_step is not None and self.decode_config.adaptive_batch:  # only the fit uses them
            start, batch = self._last_step
            obs = self._step_obs
            obs.append((batch, now - start))
            if len(obs) > 64:
                del obs[: len(obs) - 64]  # keep the latest 64
        return super().update(out, sampled, now)
