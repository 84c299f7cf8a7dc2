"""The request lifecycle: one status enum and one request record for every role.

    WAITING ──▶ RUNNING ──▶ FINISHED_STOPPED / FINISHED_LENGTH
       ▲           │
       └─PREEMPTED◀┘        (KV freed, recomputed later from prompt + tokens so far)
    WAITING_FOR_REMOTE_KV ──▶ RUNNING   (decode role: blocks reserved, KV arriving from prefill)
    any ──▶ FINISHED_ABORTED / FINISHED_ERROR

A request only carries token ids; text belongs to the router.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED")

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's `finish_reason` for a finished status."""
        return self.value if self.is_finished else None


@dataclass(eq=False)
class Request:
    """One sequence as the policies see it: token ids, how many have KV, and its blocks."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_time: float
    stop_token_ids: frozenset[int] = frozenset()
    min_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in this instance's cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    payload: Any = None  # engine-side data the policies never look at (sampling params, ...)
    # False when every prompt position must be computed here (prompt log-probabilities need each
    # position's logits), so cached prefix blocks must not stand in for them.
    use_prefix_cache: bool = True

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than one token lacks KV: the next chunk is (part of) a prefill."""
        return self.num_uncomputed_tokens > 1

    def append_token(self, token_id: int) -> RequestStatus | None:
        """Record a sampled token; return the finished status it causes, if any."""
        self.output_token_ids.append(token_id)
        n = len(self.output_token_ids)
        if token_id in self.stop_token_ids and n > self.min_tokens:
            return RequestStatus.FINISHED_STOPPED
        if n >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
