"""One instance's execution loop: policy.schedule -> runner.execute -> sample -> policy.update.

The core works in token ids. A policy object (colocated, prefill or decode) decides; the runner
computes; the core samples and hands results back. Time comes from an injected clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.sampler import BatchSampler, SamplingParams, TokenLogprobs
from pdserve.sched.output import SchedulerOutput
from pdserve.sched.request import Request


class Policy(Protocol):
    block_manager: object

    def add_request(self, req: Request, now: float) -> None: ...
    def schedule(self, now: float) -> SchedulerOutput: ...
    def update(self, out: SchedulerOutput, sampled: dict[str, int], now: float) -> list[Request]: ...
    def abort(self, request_id: str, now: float) -> Request | None: ...
    def has_work(self) -> bool: ...


@dataclass
class StepResult:
    new_tokens: dict[str, int] = field(default_factory=dict)  # request id -> token sampled this step
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # rows that asked for them (openai)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # with the first token (openai)
    finished: list[Request] = field(default_factory=list)
    output: SchedulerOutput = field(default_factory=SchedulerOutput)
    started: float = 0.0
    duration: float = 0.0


class EngineCore:
    """Steps one policy over one model runner."""

    def __init__(
        self, runner: ModelRunner, policy: Policy, clock: Callable[[], float] = time.monotonic,
        sampler: BatchSampler | None = None,
    ) -> None:
        self.runner = runner
        self.sampler = sampler or BatchSampler()  # batched sampling, grammar state (openai)
        self.policy = policy
        self.clock = clock
        self.eos_ids = frozenset(runner.shape.eos_token_ids)
        # Set by the prefill role: called as each layer's KV lands, to stream it out.
        self.layer_hook: Callable[[SchedulerOutput, int], None] | None = None
        # Held while the policy decides or updates, not while the model runs, so another thread
        # may make a quick policy call (a decode reservation) without waiting for a whole step.
        self.lock = threading.RLock()

    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop |= self.eos_ids
        return Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            max_tokens=params.max_tokens,
            arrival_time=self.clock(),
            stop_token_ids=frozenset(stop),
            min_tokens=params.min_tokens,
            payload=params,
            use_prefix_cache=params.prompt_logprobs is None,  # openai: every prompt position's logits
        )

    def add(self, req: Request) -> None:
        with self.lock:
            self.policy.add_request(req, self.clock())

    def step(self) -> StepResult:
        start = self.clock()
        with self.lock:
            out = self.policy.schedule(start)
        result = StepResult(output=out, started=start)
        if not out.chunks:
            return result
        hook = self.layer_hook
        logits = self.runner.execute(out, (lambda i: hook(out, i)) if hook else None)
        rows = [c.request for c in out.chunks if c.sample]
        # --- openai: one batched sampler (penalties, grammar, logprobs) ---
        for req, start, plogits in self.runner.prompt_logits:
            self.sampler.add_prompt_logits(req, start, plogits)
        sampled = self.sampler.sample(logits, rows)
        for r in rows:
            if not r.output_token_ids and isinstance(r.payload, SamplingParams) and r.payload.prompt_logprobs is not None:
                result.prompt_logprobs[r.request_id] = self.sampler.take_prompt_logprobs(r) or []
        result.new_tokens = {r.request_id: t for r, t in zip(rows, sampled.tokens, strict=True)}
        result.logprobs = {r.request_id: lp for r, lp in zip(rows, sampled.logprobs, strict=True) if lp is not None}
        # --- end openai ---
        now = self.clock()
        with self.lock:
            result.finished = self.policy.update(out, result.new_tokens, now)
        result.duration = now - start
        return result
