"""One simulated instance: a real `sched/` policy object stepped on a modelled clock.

The step is the engine's step with the model runner replaced by a StepTimeModel:
    out = policy.schedule(now)          # the same call the engine makes
    dt  = step_model(out's chunks)      # instead of running the model
    ... at now + dt: policy.update(out, sampled, now + dt)
Tokens are fake (0) and requests carry no stop tokens, so only max_tokens ends them.

Runs: when the policy vouches that the next k steps are plain decode steps of the same batch
(`decode_run_length`), the instance plans them as one event and applies all but the last with
`advance_decode` (the last, which may finish requests, is an ordinary schedule/update). This is
what makes a 20,000-request trace take seconds. Anything from outside
that reads or changes the policy mid-run calls `sync(now)` first: the steps already over are
applied and the one in flight is scheduled, as it was at its start, so the policy is exactly where
step-by-step stepping would have it; the run then ends with that step. `resume()` lets it go on
when the change left it valid (a reservation that leaves the blocks the run needs).
`free_blocks(now)` answers the router's question without touching the run.
Host sharing: `peers` are the instances that share this one's host (set by `sim.build` when the
step model says its times depend on them, a profile measured with its cluster on one machine:
`ProfiledModel.shares_host`); a step carrying prefill work that starts while one of them is busy
is timed with `corun=True` (`pdserve/sim/profile.py`: the co-running prefill factor), and so is a
decode-only step that starts while one of them runs a prefill step (`prefilling`: the co-running
decode factor). Runs of decode steps keep that exact: none is planned while a peer prefills, and a
peer that starts a prefill step cuts this one's run to the step in flight (`sync`), so every later
step starts with the peer's state as step-by-step stepping would see it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from pdserve.sched.output import SchedulerOutput
from pdserve.sched.request import Request
from pdserve.sim.events import EventLoop
from pdserve.sim.network import Port
from pdserve.sim.perf_model import StepTimeModel, decode_run_times

# on_step(instance, out, finished, now): the cluster's hook after each update.
StepHook = Callable[["SimInstance", SchedulerOutput, list[Request], float], None]
# on_run(instance, requests, step_ends): after a run of decode steps is applied.
RunHook = Callable[["SimInstance", list[Request], list[float]], None]

# How long the real engine thread waits before it schedules again after a step that computed
# nothing while the policy has work (serve/async_engine.py `EngineThread._run`, its 0.05 s drain).
IDLE_POLL_S = 0.05

# Steps planned at once at most (a longer run is planned again when this one ends). Most runs are
# cut short by the next request, but computing unused step times costs less than planning again.
MAX_RUN = 1024


@dataclass
class _Run:
    """Planned decode steps: step m ends at ends[m]; the first starts at `start`."""

    start: float
    ends: list[float]
    durations: list[float]
    blocks_at: list[int]  # blocks schedule() has taken once step m has started (cumulative)
    planned_last: int  # index of the last step planned
    last: int  # index of the step the run ends with now (a sync cuts it to the step in flight)
    applied: int = 0  # steps applied to the policy so far
    pending: SchedulerOutput | None = None  # step `applied`: scheduled by a sync, not yet updated

    def step_start(self, m: int) -> float:
        return self.ends[m - 1] if m else self.start


class _AllZeros(dict):  # type: ignore[type-arg]
    """The sampled tokens of every step: 0 for any request id (no per-step dict to build)."""

    def __missing__(self, key: str) -> int:
        return 0


_ZEROS: dict[str, int] = _AllZeros()


class SimInstance:
    """A policy (ColocatedScheduler, PrefillBatcher or DecodeScheduler) plus a step-time model."""

    def __init__(self, name: str, role: str, policy: Any, model: StepTimeModel, port: Port,
                 num_gpus: int = 1) -> None:
        self.name = name
        self.role = role
        self.policy = policy
        self.model = model
        self.port = port
        self.num_gpus = num_gpus
        self.busy = False
        self.prefilling = False  # the step in flight carries prefill work (peers' decode steps slow)
        self.busy_time = 0.0
        self.num_steps = 0
        self.num_batched_tokens = 0
        self.outstanding_tokens = 0  # prompt tokens routed here and not yet prefilled (router's view)
        self.kv_peak_blocks = 0  # most KV blocks in use after any step
        self._wake_at: float | None = None
        self.loop: EventLoop | None = None
        self.on_step: StepHook | None = None
        self.on_run: RunHook | None = None
        self.runs = role != "prefill"  # plan decode runs (False: one event per step, as the engine)
        self._run: _Run | None = None
        self._run_id = 0  # a run's end event only counts if no sync has moved it since
        self.peers: list[SimInstance] = []  # instances on this one's host (module doc)

    def attach(self, loop: EventLoop, on_step: StepHook, on_run: RunHook | None = None) -> None:
        self.loop = loop
        self.on_step = on_step
        self.on_run = on_run
        if on_run is None:
            self.runs = False

    def step_time(self, out: SchedulerOutput) -> float:
        return self._step_time(out)[0]

    def _step_time(self, out: SchedulerOutput) -> tuple[float, int, bool]:
        """(step seconds, tokens computed, whether it carries prefill work): one pass over the chunks."""
        decode: list[int] = []
        prefill: list[tuple[int, int]] = []
        tokens = 0
        for c in out.chunks:
            prior = c.request.num_computed_tokens
            n = c.num_tokens
            if n == 1 and c.sample and prior:
                decode.append(prior)
            else:
                prefill.append((n, prior))
                tokens += n
        tokens += len(decode)
        if not prefill:
            if self._peer_prefilling():
                return self.model.decode_time(decode, corun=True), tokens, False  # type: ignore[call-arg]
            return self.model.decode_time(decode), tokens, False
        if self.peers and any(p.busy for p in self.peers):
            return self.model.mixed_time(prefill, decode, corun=True), tokens, True  # type: ignore[call-arg]
        if not decode and not any(p for _, p in prefill):
            return self.model.prefill_time([n for n, _ in prefill]), tokens, True
        return self.model.mixed_time(prefill, decode), tokens, True

    def kick(self, now: float) -> None:
        """Start a step if idle and the policy has one; else arm the policy's timer, if any."""
        if self.busy:
            return
        if self.runs and not self._peer_prefilling() and self._plan_run(now):
            return
        out = self.policy.schedule(now)
        if not out.chunks:
            wake = self.policy.next_wakeup(now)
            if out.preempted and wake is None and self._other_work(out):
                # The step computed nothing but changed the policy (a request preempted itself):
                # the engine thread polls again, and that poll may admit another request. A poll
                # after one that changed nothing would change nothing either: no need to model it.
                wake = now + IDLE_POLL_S
            if wake is not None and (self._wake_at is None or wake < self._wake_at):
                self._wake_at = max(wake, now + 1e-9)
                self.loop.at(self._wake_at, self._wake)  # type: ignore[union-attr]
            return
        dt, tokens, self.prefilling = self._step_time(out)
        self.busy = True
        if self.prefilling:
            for p in self.peers:
                p.sync(now)  # its planned decode steps from here on start while this one prefills
        self.busy_time += dt
        self.num_steps += 1
        self.num_batched_tokens += tokens
        self.loop.at(now + dt, self._step_done, out)  # type: ignore[union-attr]

    def _peer_prefilling(self) -> bool:
        return any(p.prefilling for p in self.peers)

    def _other_work(self, out: SchedulerOutput) -> bool:
        """Work besides the requests `out` preempted. Without any, a poll would only re-admit
        them to preempt themselves again (a request that outgrows the whole cache): the engine
        spins on that until the router gives up; the simulator waits for the next event instead
        of spinning forever."""
        gone = {r.request_id for r in out.preempted}
        return bool(self.policy.running) or any(r.request_id not in gone for r in self.policy.waiting)

    # ---- runs of decode steps ------------------------------------------------------------------
    def _plan_run(self, now: float) -> bool:
        k = self.policy.decode_run_length(0, MAX_RUN)
        if k < 2:
            return False
        running = self.policy.running
        contexts = [r.num_computed_tokens for r in running]
        durations = decode_run_times(self.model, contexts, k)
        ends = list(accumulate(durations, initial=now))  # the same sums as step-by-step `now + dt`
        del ends[0]
        self._run = _Run(now, ends, durations, self.policy.decode_run_blocks(k), k - 1, k - 1)
        self._run_id += 1
        self.busy = True
        self.loop.at(ends[-1], self._run_done, self._run_id)  # type: ignore[union-attr]
        return True

    def _advance(self, run: _Run, upto: int) -> None:
        """Apply the run's steps [run.applied, upto) to the policy and the statistics."""
        a = run.applied
        if upto <= a:
            return
        ends, policy = run.ends, self.policy
        if run.pending is not None:  # scheduled at a sync: finish it as update() would
            policy.update(run.pending, _ZEROS, ends[a])  # nobody finishes inside a run
            run.pending = None
            if upto > a + 1:
                policy.advance_decode(0, ends[a + 1 : upto], ends[a])
        else:
            policy.advance_decode(0, ends[a:upto], run.step_start(a))
        run.applied = upto
        bt = self.busy_time
        for d in run.durations[a:upto]:
            bt += d
        self.busy_time = bt
        running = policy.running
        self.num_steps += upto - a
        self.num_batched_tokens += (upto - a) * len(running)
        bm = policy.block_manager
        used = bm.num_blocks - bm.num_free_blocks
        if used > self.kv_peak_blocks:
            self.kv_peak_blocks = used
        self.on_run(self, running, ends[a:upto])  # type: ignore[misc]

    def _run_done(self, now: float, run_id: int) -> None:
        run = self._run
        if run_id != self._run_id or run is None:
            return  # superseded: a sync moved the run's end
        self._run = None
        last = run.last
        self._advance(run, last)
        # The last step is an ordinary one (it may finish requests): schedule (unless a sync did)
        # and update, then the usual hook.
        out = run.pending if run.pending is not None else self.policy.schedule(run.step_start(last))
        self.busy_time += run.durations[last]
        self.num_steps += 1
        self.num_batched_tokens += len(out.chunks)
        self._step_done(now, out)

    def sync(self, now: float) -> None:
        """Before the policy is read or changed from outside: bring it exactly to `now`.

        The steps over are applied, the one in flight is scheduled (as at its start) and the run
        is cut to end with it.
        """
        run = self._run
        if run is None:
            return
        j = min(bisect_left(run.ends, now), run.last)  # the step in flight
        self._advance(run, j)
        if run.pending is None:
            run.pending = self.policy.schedule(run.step_start(j))
        if run.last != j:
            run.last = j
            self._run_id += 1
            self.loop.at(run.ends[j], self._run_done, self._run_id)  # type: ignore[union-attr]

    def resume(self) -> None:
        """After a sync: let the run go on as planned if it still can.

        It can if nothing waits to be admitted and the blocks its remaining steps take are free
        (a reservation only takes blocks; running requests are untouched).
        """
        run = self._run
        if run is None or run.last == run.planned_last or self.policy.waiting or self._peer_prefilling():
            return
        need = run.blocks_at[run.planned_last] - run.blocks_at[run.last]
        if need > self.policy.block_manager.num_free_blocks:
            return
        run.last = run.planned_last
        self._run_id += 1
        self.loop.at(run.ends[run.last], self._run_done, self._run_id)  # type: ignore[union-attr]

    def free_blocks(self, now: float) -> int:
        """The policy's free KV blocks as of `now`, mid-run included (the router's view)."""
        free = self.policy.block_manager.num_free_blocks
        run = self._run
        if run is None:
            return free
        j = min(bisect_left(run.ends, now), run.last)  # the step in flight has taken its blocks
        done = run.applied if run.pending is not None else run.applied - 1  # steps already scheduled
        return free - run.blocks_at[j] + (run.blocks_at[done] if done >= 0 else 0)

    def _wake(self, now: float) -> None:
        if self._wake_at is not None and now >= self._wake_at:
            self._wake_at = None
        self.kick(now)

    def _step_done(self, now: float, out: SchedulerOutput) -> None:
        finished = self.policy.update(out, _ZEROS, now)
        self.busy = False
        self.prefilling = False
        self.on_step(self, out, finished, now)  # type: ignore[misc]
        self.kick(now)

    def stats(self, duration: float) -> dict[str, Any]:
        return {
            "role": self.role,
            "gpus": self.num_gpus,
            "steps": self.num_steps,
            "busy_frac": self.busy_time / duration if duration > 0 else 0.0,
            "mean_batched_tokens": self.num_batched_tokens / self.num_steps if self.num_steps else 0.0,
            "kv_peak_usage": self.kv_peak_blocks / self.policy.block_manager.num_blocks,
        }
