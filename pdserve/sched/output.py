"""The plain data a policy hands the engine (or the simulator) for one step."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.sched.request import Request


@dataclass(slots=True)
class ScheduledChunk:
    """Compute KV for tokens [request.num_computed_tokens, + num_tokens); sample if `sample`."""

    request: Request
    num_tokens: int
    sample: bool

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum([c.num_tokens for c in self.chunks])

    @property
    def num_prefill_tokens(self) -> int:
        return sum([c.num_tokens for c in self.chunks if c.num_tokens > 1 or not c.sample])

    @property
    def num_decode_seqs(self) -> int:
        return len([c for c in self.chunks if c.num_tokens == 1 and c.sample])

    def __bool__(self) -> bool:
        return bool(self.chunks)
