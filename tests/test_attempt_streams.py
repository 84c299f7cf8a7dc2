"""The router's per-attempt stream wrappers (serve/attempt_streams.py), on plain generators."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import pytest

from pdserve.serve.attempt_streams import with_deadline
from pdserve.serve.backend import BackendError, TokenEvent


def test_the_deadline_ends_a_wait_that_no_other_timeout_ends() -> None:
    """A prefill that keeps reporting progress is never "silent": the overall deadline must end the
    wait for its first token itself (504), and close the attempt (its Calls abort on the workers)."""
    closed: list[bool] = []

    async def attempt() -> AsyncGenerator[TokenEvent, None]:
        try:
            yield TokenEvent([5], None)
            await asyncio.sleep(3600)  # waiting on a worker that says "still computing"
            yield TokenEvent([6], "length")
        finally:
            closed.append(True)

    async def run() -> tuple[list[list[int]], float]:
        got: list[list[int]] = []
        t0 = time.monotonic()
        with pytest.raises(BackendError) as e:
            async for ev in with_deadline(attempt(), time.monotonic() + 0.3):
                got.append(ev.token_ids)
        assert e.value.status == 504
        return got, time.monotonic() - t0

    got, waited = asyncio.run(run())
    assert got == [[5]] and closed == [True]
    assert waited < 60  # the deadline ended it, not the hour-long wait (or the test's own timeout)


def test_a_stream_that_ends_in_time_is_passed_through() -> None:
    async def attempt() -> AsyncGenerator[TokenEvent, None]:
        yield TokenEvent([1], None)
        yield TokenEvent([2], "stop")

    async def run() -> list[list[int]]:
        return [ev.token_ids async for ev in with_deadline(attempt(), time.monotonic() + 60)]

    assert asyncio.run(run()) == [[1], [2]]
