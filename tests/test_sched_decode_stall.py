"""DecodeScheduler.reserve under memory pressure: no new reservations while a preempted request
waits, and a watermark of free blocks for running sequences (the simulator's decode stall)."""

from pdserve.sched import DecodeScheduler, Request, RequestStatus
from tests.test_sched_decode import FakeModel, all_free, make, new_req, reference


def _step(s: DecodeScheduler, model: FakeModel, now: float) -> list[Request]:
    out = s.schedule(now)
    return s.update(out, model.execute(out), now + 0.005)


def test_reserve_refuses_while_a_preempted_request_waits() -> None:
    # 5 blocks of 4 tokens; a and b (7-token prompts) hold 2 blocks each, both decode.
    s = make(num_blocks=5, max_batch_size=2)
    model = FakeModel(s.block_manager)
    a, b = new_req("a", n=7, max_tokens=4), new_req("b", n=7, max_tokens=4)
    assert s.reserve(a, 0.0) and s.reserve(b, 0.0)
    model.transfer(s, a, 0.0)
    model.transfer(s, b, 0.0)
    _step(s, model, 0.1)  # both reach 9 tokens: each needs a third block, one is free
    _step(s, model, 0.2)
    assert b.status is RequestStatus.PREEMPTED and list(s.waiting) == [b]
    assert s.block_manager.num_free_blocks == 2  # b's blocks are back...
    small = new_req("c", n=3, max_tokens=2)
    assert s.reserve(small, 0.3) is False  # ...but they are b's to recompute into, not c's
    assert small.block_ids == [] and s.num_reserved == 0
    finished: dict[str, Request] = {}
    now = 0.3
    while s.has_work():
        for r in _step(s, model, now):
            finished[r.request_id] = r
        if b.status is RequestStatus.RUNNING:
            break  # readmitted: reservations are welcome again
        now += 0.1
    assert b.status is RequestStatus.RUNNING
    assert s.reserve(small, now) is True
    while s.has_work() or s.num_reserved:
        if small.request_id in s.reserved:
            model.transfer(s, small, now)
        for r in _step(s, model, now):
            finished[r.request_id] = r
        now += 0.1
    assert {k: r.output_token_ids for k, r in finished.items()} == {
        r.request_id: reference(r.prompt_token_ids, r.max_tokens) for r in (a, b, small)
    }
    assert all_free(s)


def test_reserve_keeps_a_watermark_while_sequences_run() -> None:
    s = make(num_blocks=200)  # watermark: max(1, 200 // 100) = 2 blocks
    assert s.watermark == 2
    model = FakeModel(s.block_manager)
    a = new_req("a", n=7, max_tokens=50)
    assert s.reserve(a, 0.0)
    model.transfer(s, a, 0.0)
    _step(s, model, 0.1)
    free = s.block_manager.num_free_blocks  # 198
    # A prompt whose KV (+ first token) needs free - 1 blocks would leave 1 < 2 for a to grow into.
    big = new_req("big", n=(free - 1) * 4 - 1)
    assert s.reserve(big, 0.2) is False and big.block_ids == []
    fits = new_req("fits", n=(free - 2) * 4 - 1)
    assert s.reserve(fits, 0.2) is True
    assert s.block_manager.num_free_blocks == 2


def test_watermark_does_not_apply_to_an_idle_instance() -> None:
    # Nothing runs, so nothing needs room to grow: a reservation may take every block.
    s = make(num_blocks=10)
    r = new_req("r", n=39)  # 40 tokens = 10 blocks
    assert s.reserve(r, 0.0) is True and s.block_manager.num_free_blocks == 0


def test_steady_reservations_do_not_starve_a_preempted_request() -> None:
    """The stall: a new reservation arrives every step and would take any block that frees up."""
    s = make(num_blocks=12, max_batch_size=4, max_num_seqs=64, max_num_batched_tokens=64)
    model = FakeModel(s.block_manager)
    reqs = [new_req(f"r{i}", n=6, max_tokens=12) for i in range(40)]
    pending = list(reqs)
    finished: dict[str, Request] = {}
    now = 0.0
    for _ in range(3000):
        if pending and s.reserve(pending[0], now):
            model.transfer(s, pending.pop(0), now)
        for r in _step(s, model, now):
            finished[r.request_id] = r
        now += 0.01
        if not (pending or s.has_work() or s.num_reserved):
            break
    assert s.num_preemptions > 0
    assert len(finished) == len(reqs)
    assert {k: r.output_token_ids for k, r in finished.items()} == {
        r.request_id: reference(r.prompt_token_ids, r.max_tokens) for r in reqs
    }
