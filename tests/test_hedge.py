"""The hedged-prefill policy, pure and stepped by hand: when to hedge, the delay, the cap."""

from __future__ import annotations

from pdserve.sched.hedge import HedgePolicy


def test_off_by_default_and_with_a_zero_cap() -> None:
    h = HedgePolicy()
    h.arrived()
    assert not h.enabled and not h.try_hedge(100.0)
    h = HedgePolicy(after_s=0.1, max_fraction=0.0)
    h.arrived()
    assert not h.try_hedge(100.0)


def test_hedges_only_after_the_delay() -> None:
    h = HedgePolicy(after_s=0.5, max_fraction=1.0)
    h.arrived()
    assert not h.try_hedge(0.49)
    assert h.try_hedge(0.5)


def test_the_cap_holds_when_every_request_is_late() -> None:
    """Overload: every request waits past the delay; hedges stay within the fraction of the window."""
    h = HedgePolicy(after_s=0.1, max_fraction=0.1, window=50)
    hedged = 0
    for _ in range(500):
        h.arrived()
        hedged += h.try_hedge(10.0)
        assert h.hedged_fraction <= 0.1 + 1e-9
    assert 45 <= hedged <= 55  # about a tenth of 500: the cap is a rate, it refills as the window moves


def test_percentile_delay_follows_recent_first_tokens_but_not_below_the_floor() -> None:
    h = HedgePolicy(after_s=0.2, percentile=90, max_fraction=1.0, window=100, min_samples=10)
    for k in range(5):
        h.observe(1.0 + k)
    assert h.delay() == float("inf")  # too few samples to tell slow from normal: no hedging yet
    h.arrived()
    assert not h.try_hedge(100.0)
    for k in range(100):
        h.observe(k / 100)  # 0.00 .. 0.99: the older, slower samples leave the window
    assert abs(h.delay() - 0.9) < 0.02
    h2 = HedgePolicy(after_s=2.0, percentile=90, max_fraction=1.0, min_samples=1)
    h2.observe(0.1)
    assert h2.delay() == 2.0  # the floor
    h.arrived()
    assert not h.try_hedge(0.5) and h.try_hedge(0.95)


def test_a_quiet_cluster_is_almost_never_hedged() -> None:
    """First tokens well under the delay: no request qualifies, whatever the cap."""
    h = HedgePolicy(after_s=0.5, percentile=99, max_fraction=0.5)
    for k in range(1000):
        h.arrived()
        t = 0.05 + (k % 10) / 100  # 50..140 ms
        if not h.try_hedge(t):
            h.observe(t)
    assert h.hedged_fraction == 0.0
