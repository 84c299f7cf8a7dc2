"""One simulated instance: a real `sched/` policy object stepped on a modelled clock.

The step is the engine's step with the model runner replaced by a StepTimeModel:
    out = policy.schedule(now)          # the same call the engine makes
    dt  = step_model(out's chunks)      # instead of running the model
    ... at now + dt: policy.update(out, sampled, now + dt)
Tokens are fake (0) and requests carry no stop tokens, so only max_tokens ends them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pdserve.sched.output import SchedulerOutput
from pdserve.sched.request import Request
from pdserve.sim.events import EventLoop
from pdserve.sim.network import Port
from pdserve.sim.perf_model import StepTimeModel

# on_step(instance, out, finished, now): the cluster's hook after each update.
StepHook = Callable[["SimInstance", SchedulerOutput, list[Request], float], None]


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
        self.busy_time = 0.0
        self.num_steps = 0
        self.num_batched_tokens = 0
        self.outstanding_tokens = 0  # prompt tokens routed here and not yet prefilled (router's view)
        self.kv_peak_blocks = 0  # most KV blocks in use after any step
        self._wake_at: float | None = None
        self.loop: EventLoop | None = None
        self.on_step: StepHook | None = None

    def attach(self, loop: EventLoop, on_step: StepHook) -> None:
        self.loop = loop
        self.on_step = on_step

    def step_time(self, out: SchedulerOutput) -> float:
        return self._step_time(out)[0]

    def _step_time(self, out: SchedulerOutput) -> tuple[float, int]:
        """(step seconds, tokens computed): one pass over the chunks."""
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
            return self.model.decode_time(decode), tokens
        if not decode and not any(p for _, p in prefill):
            return self.model.prefill_time([n for n, _ in prefill]), tokens
        return self.model.mixed_time(prefill, decode), tokens

    def kick(self, now: float) -> None:
        """Start a step if idle and the policy has one; else arm the policy's timer, if any."""
        if self.busy:
            return
        out = self.policy.schedule(now)
        if not out.chunks:
            wake = self.policy.next_wakeup(now)
            if wake is not None and (self._wake_at is None or wake < self._wake_at):
                self._wake_at = max(wake, now + 1e-9)
                self.loop.at(self._wake_at, self._wake)  # type: ignore[union-attr]
            return
        dt, tokens = self._step_time(out)
        self.busy = True
        self.busy_time += dt
        self.num_steps += 1
        self.num_batched_tokens += tokens
        self.loop.at(now + dt, self._step_done, out)  # type: ignore[union-attr]

    def _wake(self, now: float) -> None:
        if self._wake_at is not None and now >= self._wake_at:
            self._wake_at = None
        self.kick(now)

    def _step_done(self, now: float, out: SchedulerOutput) -> None:
        finished = self.policy.update(out, _ZEROS, now)
        self.busy = False
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
