"""Circuit breakers stepped by hand (pure: time is an argument)."""

from __future__ import annotations

from pdserve.sched.breaker import BreakerState, CircuitBreaker, Outcome


def _opened(now: float = 0.0) -> CircuitBreaker:
    b = CircuitBreaker(failure_threshold=2, reset_timeout_s=5.0, probe_timeout_s=30.0)
    for _ in range(2):
        b.dispatch(now).end(Outcome.FAILURE, now)
    assert b.state is BreakerState.OPEN and not b.allow(now)
    return b


def test_failures_in_a_row_open_then_reset_lets_one_probe_through() -> None:
    b = _opened()
    assert not b.allow(4.9)
    assert b.allow(5.0) and b.state is BreakerState.HALF_OPEN
    probe = b.dispatch(5.0)
    assert probe.probe and not b.allow(5.1)  # one probe at a time
    probe.end(Outcome.SUCCESS, 6.0)
    assert b.state is BreakerState.CLOSED and b.allow(6.0)


def test_failed_probe_opens_again() -> None:
    b = _opened()
    assert b.allow(5.0)
    b.dispatch(5.0).end(Outcome.FAILURE, 5.5)
    assert b.state is BreakerState.OPEN and not b.allow(10.4) and b.allow(10.5)


def test_neutral_probe_frees_the_slot() -> None:
    """The defect: a probe that ended on a stop string, a client disconnect, a 400 or a 504 left
    `probing` set forever and the worker shut out for good."""
    b = _opened()
    assert b.allow(5.0)
    b.dispatch(5.0).end(Outcome.NEUTRAL, 5.2)
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow(5.3)  # the next request is the next probe
    b.dispatch(5.3).end(Outcome.SUCCESS, 5.4)
    assert b.state is BreakerState.CLOSED


def test_probe_times_out() -> None:
    """A probe that never reports (or is a very long generation) stops blocking after probe_timeout_s."""
    b = _opened()
    assert b.allow(5.0)
    slow = b.dispatch(5.0)
    assert not b.allow(34.9)
    assert b.allow(35.0)
    second = b.dispatch(35.0)
    assert not b.allow(35.1)
    slow.end(Outcome.NEUTRAL, 36.0)  # the old probe ending does not free the new probe's slot
    assert not b.allow(36.0)
    second.end(Outcome.SUCCESS, 37.0)
    assert b.state is BreakerState.CLOSED


def test_each_dispatch_counts_once() -> None:
    b = CircuitBreaker(failure_threshold=2)
    d = b.dispatch(0.0)
    d.end(Outcome.FAILURE, 0.0)
    d.end(Outcome.FAILURE, 0.0)  # ignored: the first outcome stands
    assert b.failures == 1 and b.state is BreakerState.CLOSED
    d.end(Outcome.SUCCESS, 0.0)
    assert b.failures == 1


def test_success_resets_the_run_and_neutral_does_not() -> None:
    b = CircuitBreaker(failure_threshold=2)
    b.dispatch(0.0).end(Outcome.FAILURE, 0.0)
    b.dispatch(0.0).end(Outcome.NEUTRAL, 0.0)  # overload, a client gone: says nothing
    assert b.failures == 1
    b.dispatch(0.0).end(Outcome.SUCCESS, 0.0)
    assert b.failures == 0
    b.dispatch(0.0).end(Outcome.FAILURE, 0.0)
    assert b.state is BreakerState.CLOSED


def test_outcomes_of_requests_from_before_the_circuit_opened_do_not_close_it() -> None:
    b = CircuitBreaker(failure_threshold=1)
    old = b.dispatch(0.0)
    b.dispatch(0.0).end(Outcome.FAILURE, 1.0)
    assert b.state is BreakerState.OPEN
    old.end(Outcome.SUCCESS, 2.0)  # started while closed: the reset timer and a probe decide
    assert b.state is BreakerState.OPEN and not b.allow(2.0) and b.allow(6.0)
