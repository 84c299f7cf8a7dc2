"""What the OpenAI front needs from whatever generates tokens: a local engine or a cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.engine.sampler import SamplingParams, TokenLogprobs


@dataclass
class TokenEvent:
    """New tokens of one request; `finish_reason` set on the last event."""

    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None  # the request failed; the front turns this into an error
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds, on the last event
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None  # one per token, when the request asked for them
    prompt_logprobs: list[TokenLogprobs] | None = None  # with the first token: prompt tokens 2..


class BackendError(Exception):
    """A request the backend refuses (full, overloaded): carries an HTTP status."""

    def __init__(self, message: str, status: int = 503, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Backend(Protocol):
    max_model_len: int

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenEvent]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict[str, float]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
