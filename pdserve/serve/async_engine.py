"""An engine core stepped in a background thread, fed and drained from asyncio.

The engine thread owns the policy and the KV cache; the event loop only posts commands (add,
abort) to a queue and receives results through `call_soon_threadsafe`. Nothing else is shared.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from pdserve.engine.core import EngineCore, StepResult
from pdserve.engine.sampler import SamplingParams
from pdserve.sched.admission import admission_error, limits_for, max_sequence_tokens
from pdserve.sched.request import Request
from pdserve.serve.backend import BackendError, TokenEvent


class EngineThread:
    """Runs `core.step()` in a loop; `submit` runs a function on the engine thread between steps."""

    def __init__(self, core: EngineCore, on_step: Callable[[StepResult], None]) -> None:
        self.core = core
        self.on_step = on_step
        self.commands: queue.SimpleQueue[Callable[[], Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.busy_time = 0.0  # seconds spent computing, for the utilization metric
        self.started_at = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.commands.put(lambda: None)
        self._thread.join(timeout=10)

    def submit(self, fn: Callable[[], Any]) -> None:
        self.commands.put(fn)

    def _drain(self, timeout: float | None) -> None:
        try:
            fn = self.commands.get(timeout=timeout) if timeout is None or timeout > 0 else self.commands.get_nowait()
        except queue.Empty:
            return
        with self.core.lock:  # commands touch the policy, which the lock guards
            fn()
            while True:
                try:
                    self.commands.get_nowait()()
                except queue.Empty:
                    return

    def _run(self) -> None:
        policy = self.core.policy
        while not self._stop.is_set():
            now = self.core.clock()
            if not policy.has_work():
                self._drain(None)  # sleep until a command (new work) arrives
                continue
            self._drain(0)
            result = self.core.step()
            if not result.output.chunks:
                wake = policy.next_wakeup(now)  # type: ignore[attr-defined]
                self._drain(max(0.0, wake - now) if wake is not None else 0.05)
                continue
            self.busy_time += result.duration
            self.on_step(result)


class LocalBackend:
    """A colocated engine in this process, behind the `Backend` interface."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.max_model_len = core.runner.shape.max_model_len
        self.limits = limits_for(core.policy, self.max_model_len, core.runner.shape.vocab_size)  # type: ignore[arg-type]
        self.max_sequence_tokens = max_sequence_tokens(self.limits)  # the front fills max_tokens up to it
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queues: dict[str, asyncio.Queue[TokenEvent]] = {}
        self.thread = EngineThread(core, self._on_step)
        self.draining = False  # set on SIGTERM: in-flight requests finish, new ones are refused

    def health(self) -> tuple[bool, dict[str, object]]:
        """Can this server take a request now? (False while draining.)"""
        if self.draining:
            return False, {"status": "draining", "reason": "the server is draining: it finishes its "
                           f"{len(self.queues)} in-flight requests, then exits"}
        return True, {"status": "ok"}

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.thread.stop)

    def _on_step(self, result: StepResult) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._dispatch, result)

    def _dispatch(self, result: StepResult) -> None:
        finished = {r.request_id: r for r in result.finished}
        for rid, tok in result.new_tokens.items():
            q = self.queues.get(rid)
            if q is None:
                continue
            req = finished.pop(rid, None)
            ev = self._event([tok], req)
            lp = result.logprobs.get(rid)
            ev.logprobs = [lp] if lp is not None else None
            ev.prompt_logprobs = result.prompt_logprobs.get(rid)
            q.put_nowait(ev)
        for rid, req in finished.items():  # finished without a new token (e.g. aborted)
            q = self.queues.get(rid)
            if q is not None:
                q.put_nowait(self._event([], req))

    @staticmethod
    def _event(tokens: list[int], req: Request | None) -> TokenEvent:
        if req is None:
            return TokenEvent(tokens)
        timings = {}
        if req.first_scheduled_time is not None:
            timings["queue"] = req.first_scheduled_time - req.arrival_time
        if req.first_token_time is not None and req.first_scheduled_time is not None:
            timings["prefill"] = req.first_token_time - req.first_scheduled_time
        if req.finished_time is not None and req.first_token_time is not None:
            timings["decode"] = req.finished_time - req.first_token_time
        return TokenEvent(tokens, req.status.finish_reason, timings=timings,
                          num_cached_tokens=req.num_cached_tokens)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        if self.draining:
            raise BackendError("the server is draining; retry on another", 503, retry_after=1)
        why = admission_error(prompt_token_ids, params.max_tokens, self.limits)
        if why is not None:  # it could never finish: refuse it before it blocks the queue for good
            raise BackendError(why, 400)
        if params.guided is not None:
            try:
                self.core.sampler.check(params.guided)
            except ValueError as e:
                raise BackendError(str(e), 400) from None
        q: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.queues[request_id] = q
        req = self.core.make_request(request_id, prompt_token_ids, params)
        self.thread.submit(lambda: self.core.add(req))
        try:
            while True:
                ev = await q.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self.queues.pop(request_id, None)
            if req.status is not None and not req.status.is_finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        core = self.core
        self.thread.submit(lambda: core.policy.abort(request_id, core.clock()))

    def stats(self) -> dict[str, float]:
        p = self.core.policy
        bm = p.block_manager
        elapsed = max(1e-9, time.monotonic() - self.thread.started_at)
        return {
            "num_requests_running": float(p.num_running),  # type: ignore[attr-defined]
            "num_requests_waiting": float(p.num_waiting),  # type: ignore[attr-defined]
            "kv_cache_usage": bm.usage,  # type: ignore[attr-defined]
            "kv_free_blocks": float(bm.num_free_blocks),  # type: ignore[attr-defined]
            "kv_total_blocks": float(bm.num_blocks),  # type: ignore[attr-defined]
            "busy_fraction": self.thread.busy_time / elapsed,
        }

