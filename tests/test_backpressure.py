"""Decode back-pressure on the prefill batcher, stepped by hand: the cluster signal, the pace it
gives, and what the batcher does with it (hold, smaller batches, never earlier ones)."""

import pytest

from pdserve.config.engine import PrefillConfig
from pdserve.sched import BlockManager, PrefillBatcher, Request
from pdserve.sched.backpressure import SETTLE_S, STALE_S, BackPressure, DecodeSignal, Pace, cluster_signal
from pdserve.sched.routing import WorkerLoad

IDLE = DecodeSignal(free_blocks=90, total_blocks=100)
FULL = DecodeSignal(free_blocks=2, total_blocks=100, reserved=3, waiting=2)  # a queue on its 1 worker
QUEUED = DecodeSignal(free_blocks=40, total_blocks=100, waiting=3, workers=2)  # 3 ready, 2 workers


def batcher(**cfg) -> PrefillBatcher:
    cfg = {"max_batch_tokens": 1000, "min_batch_scale": 0.25, "target_utilization": 0.85,
           "max_wait_ms": 1e6, "decode_hold_ms": 500.0, **cfg}
    return PrefillBatcher(PrefillConfig(**cfg), BlockManager(1024, 4))


def req(rid: str, n: int) -> Request:
    return Request(rid, [i % 97 + 1 for i in range(n)], max_tokens=8, arrival_time=0.0)


def test_the_signal_sums_every_available_decode_worker() -> None:
    loads = [WorkerLoad("d0", free_blocks=10, total_blocks=100, reserved=2, waiting=1),
             WorkerLoad("d1", free_blocks=50, total_blocks=100, reserved=1, waiting=0),
             WorkerLoad("d2", free_blocks=100, total_blocks=100, available=False)]
    s = cluster_signal(loads)
    assert s == DecodeSignal(60, 200, 3, 1, 2)
    assert s.free_fraction == pytest.approx(0.3) and not s.saturated
    assert cluster_signal(loads[2:]) is None
    # Saturation is the pool's, not the last-picked worker's: one behind worker of two is not.
    one = [WorkerLoad("a", free_blocks=0, total_blocks=100, waiting=2), WorkerLoad("b", free_blocks=90, total_blocks=100)]
    assert not cluster_signal(one).saturated
    assert QUEUED.saturated  # more ready sequences queued on decode than it has workers
    # Low free KV alone (blocks reserved for prefill's own queue) neither holds nor shrinks batches.
    tight = DecodeSignal(free_blocks=2, total_blocks=100, reserved=9)
    assert not tight.saturated
    bp = BackPressure(min_scale=0.25, max_hold_s=0.5)
    bp.observe(tight, 0.0)
    assert bp.pace(0.0) == Pace(1.0)


def test_pace_stepped_through_idle_filling_saturated_and_stale() -> None:
    bp = BackPressure(min_scale=0.25, max_hold_s=0.5)
    assert bp.pace(0.0).scale == 1.0 and not bp.pace(0.0).holds(0.0)  # nothing heard yet
    bp.observe(IDLE, 1.0)
    assert bp.pace(1.0).scale == 1.0 and bp.pace(1.0).hold_until is None
    behind = DecodeSignal(275, 1000, waiting=1)  # free share halfway between HOLD_FREE and FULL_FREE
    bp.observe(behind, 1.1)
    assert bp.pace(1.1).scale == 1.0  # a queue seen once: a batch's KV just arrived
    bp.observe(behind, 1.1 + SETTLE_S)  # it stayed: smaller batches, no hold (only one waits)
    assert bp.pace(1.4).scale == pytest.approx(0.625) and bp.pace(1.4).hold_until is None
    bp.observe(IDLE, 1.5)
    bp.observe(FULL, 1.8)  # a queue seen once: a batch's KV just arrived, not saturation yet
    assert not bp.pace(1.8).holds(1.8)
    bp.observe(IDLE, 1.9)  # ...and it cleared on the next step
    bp.observe(FULL, 2.0 - SETTLE_S)
    bp.observe(FULL, 2.0)  # the queue stayed for SETTLE_S: decode is behind
    pace = bp.pace(2.0)
    assert pace.scale == 0.25 and pace.hold_until == pytest.approx(2.5) and pace.holds(2.4)
    bp.observe(FULL, 2.3)  # still saturated: the hold counts from when it began, not from each report
    assert bp.pace(2.3).hold_until == pytest.approx(2.5) and not bp.pace(2.5).holds(2.5)
    bp.batch_started(2.6)  # a batch went out after the hold: the next one is held anew
    assert bp.pace(2.6).hold_until == pytest.approx(3.1)
    bp.observe(IDLE, 2.7)  # decode freed up: no hold at once
    assert not bp.pace(2.7).holds(2.7) and bp.pace(2.7).scale == 1.0
    bp.observe(FULL, 3.0)
    bp.observe(FULL, 3.0 + SETTLE_S)
    assert bp.pace(3.3).holds(3.3)
    assert not bp.pace(3.3 + STALE_S).holds(3.3 + STALE_S)  # a silent router stalls nothing
    zero = BackPressure(0.25, max_hold_s=0.0)
    zero.observe(FULL, 0.0)
    zero.observe(FULL, SETTLE_S)
    assert not zero.pace(SETTLE_S).holds(SETTLE_S) and zero.pace(SETTLE_S).scale == 0.25


def test_a_smaller_budget_does_not_start_batches_sooner() -> None:
    p = batcher()
    for i in range(3):
        p.add_request(req(f"r{i}", 100), 0.0)
    p.set_decode_signal(DecodeSignal(100, 1000, waiting=1), -SETTLE_S)
    p.set_decode_signal(DecodeSignal(100, 1000, waiting=1), 0.0)  # behind: budget 1000 * (0.25 + 0.75 * 0.11)
    assert not p.schedule(0.0)  # 300 queued < 0.85 x the full 1000: not ready, whatever the budget
    for i in range(3, 9):
        p.add_request(req(f"r{i}", 100), 0.0)
    out = p.schedule(0.0)  # 900 >= 850: starts, but holds only the shrunken budget
    assert p.budget == pytest.approx(333, abs=1)
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1", "r2"]


def test_saturated_decode_holds_batches_and_the_engine_wakes_when_the_hold_ends() -> None:
    p = batcher(max_wait_ms=10.0)
    p.set_decode_signal(FULL, 0.0)
    p.set_decode_signal(FULL, 0.3)  # behind for SETTLE_S: hold from 0.3
    p.add_request(req("a", 100), 0.3)
    assert not p.schedule(0.5)  # past max_wait, but decode is behind: held
    assert p.next_wakeup(0.5) == pytest.approx(0.8)  # the hold's end, not a spin on the fired timer
    out = p.schedule(0.8)  # the hold is bounded: one smallest-budget batch goes out
    assert [c.request.request_id for c in out.chunks] == ["a"] and p.budget == 250
    p.add_request(req("b", 100), 0.8)
    p.set_decode_signal(FULL, 0.9)
    assert not p.schedule(1.0) and p.next_wakeup(1.0) == pytest.approx(1.3)  # held again from 0.8
    p.set_decode_signal(IDLE, 1.1)  # the heartbeat says decode caught up: go at once
    assert [c.request.request_id for c in p.schedule(1.1).chunks] == ["b"] and p.budget == 1000
