"""DecodeScheduler stepped by hand: reservations, remote KV, continuous batching, adaptive batch."""

import zlib

import pytest

from pdserve.config.engine import DecodeConfig
from pdserve.sched import BlockManager, DecodeScheduler, Request, RequestStatus, SchedulerOutput

BS = 4


def next_token(context: list[int]) -> int:
    return zlib.crc32(repr(context).encode()) % 100 + 10


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    out: list[int] = []
    while len(out) < max_tokens:
        out.append(next_token(prompt + out))
    return out


class FakeModel:
    """Token ids stand in for KV; every step reads the context back through the block table."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.kv: dict[tuple[int, int], int] = {}

    def _slot(self, req: Request, pos: int) -> tuple[int, int]:
        block = req.block_ids[pos // BS]
        assert self.bm.ref_count[block] > 0
        return block, pos % BS

    def write(self, req: Request, start: int, n: int) -> None:
        for pos in range(start, start + n):
            self.kv[self._slot(req, pos)] = req.all_token_ids[pos]

    def read(self, req: Request, n: int) -> list[int | None]:
        return [self.kv.get(self._slot(req, pos)) for pos in range(n)]

    def transfer(self, sched: DecodeScheduler, req: Request, now: float) -> Request | None:
        """What the prefill worker does: fill the reserved blocks and send the first token."""
        self.write(req, 0, req.num_prompt_tokens)
        return sched.remote_kv_done(req.request_id, next_token(req.prompt_token_ids), now)

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        sampled = {}
        for c in out.chunks:
            req = c.request
            assert self.read(req, c.start) == req.all_token_ids[: c.start]
            self.write(req, c.start, c.num_tokens)
            if c.sample:
                sampled[req.request_id] = next_token(self.read(req, req.num_tokens))
        return sampled


def make(num_blocks: int = 256, **cfg) -> DecodeScheduler:
    cfg.setdefault("max_batch_size", 8)
    cfg.setdefault("max_num_seqs", max(16, cfg["max_batch_size"]))
    cfg.setdefault("min_batch_size", 1)
    return DecodeScheduler(DecodeConfig(**cfg), BlockManager(num_blocks, BS))


def new_req(rid: str, n: int = 6, max_tokens: int = 4, **kw) -> Request:
    prompt = [zlib.crc32(f"{rid}{i}".encode()) % 50 + 1 for i in range(n)]
    return Request(rid, prompt, max_tokens=max_tokens, arrival_time=0.0, **kw)


def all_free(s: DecodeScheduler) -> bool:
    return s.block_manager.num_free_blocks == s.block_manager.num_blocks


# ---- reservations --------------------------------------------------------------------------
def test_reserve_holds_blocks_and_nothing_runs_until_kv_arrives() -> None:
    s = make()
    r = new_req("a", n=7)
    assert s.reserve(r, 0.0) is True
    assert r.status is RequestStatus.WAITING_FOR_REMOTE_KV
    assert len(r.block_ids) == 2  # 7 prompt tokens + the first token
    assert s.num_reserved == 1 and s.block_manager.num_free_blocks == 254
    assert not s.has_work()
    for t in (0.1, 0.2):
        assert not s.schedule(t)
    assert r.output_token_ids == []


def test_reserve_refuses_at_once_when_blocks_run_out() -> None:
    s = make(num_blocks=5)
    a, b = new_req("a", n=11), new_req("b", n=11)  # 3 blocks each
    assert s.reserve(a, 0.0)
    assert s.reserve(b, 0.0) is False
    assert b.block_ids == [] and b.status is RequestStatus.WAITING
    assert s.num_reserved == 1 and s.block_manager.num_free_blocks == 2
    assert s.reserve(new_req("c", n=7), 0.0)  # a smaller one still fits


def test_reserve_refuses_at_max_num_seqs_counting_reserved_and_admitted() -> None:
    s = make(max_batch_size=2, max_num_seqs=2)
    model = FakeModel(s.block_manager)
    a, b = new_req("a", max_tokens=10), new_req("b")
    assert s.reserve(a, 0.0) and s.reserve(b, 0.0)
    assert s.reserve(new_req("c"), 0.0) is False
    model.transfer(s, a, 0.1)  # a now ready/running, b still reserved
    out = s.schedule(0.2)
    s.update(out, model.execute(out), 0.21)
    assert s.reserve(new_req("d"), 0.3) is False
    s.remote_kv_failed("b", 0.4)
    assert s.reserve(new_req("e"), 0.5) is True


def test_remote_kv_done_joins_next_step_and_decodes_one_token_per_step() -> None:
    s = make()
    model = FakeModel(s.block_manager)
    r = new_req("a", n=6, max_tokens=4)
    s.reserve(r, 0.0)
    assert model.transfer(s, r, 1.0) is None
    assert r.status is RequestStatus.WAITING and r.first_token_time == 1.0
    assert r.num_computed_tokens == 6 and len(r.output_token_ids) == 1
    assert s.num_reserved == 0 and s.num_waiting == 1 and s.has_work()
    finished = []
    for step in range(3):
        out = s.schedule(2.0 + step)
        assert [(c.request.request_id, c.start, c.num_tokens, c.sample) for c in out.chunks] == [
            ("a", 6 + step, 1, True)
        ]
        assert out.num_decode_seqs == 1 and out.num_prefill_tokens == 0
        if step == 0:
            assert r.status is RequestStatus.RUNNING and r.first_scheduled_time == 2.0
        finished = s.update(out, model.execute(out), 2.5 + step)
        assert len(r.output_token_ids) == 2 + step
    assert finished == [r]
    assert r.output_token_ids == reference(r.prompt_token_ids, 4)
    assert r.status is RequestStatus.FINISHED_LENGTH and r.finished_time == 4.5
    assert not s.has_work() and all_free(s)


def test_max_tokens_one_finishes_on_remote_kv_done() -> None:
    s = make()
    r = new_req("a", max_tokens=1)
    s.reserve(r, 0.0)
    assert s.remote_kv_done("a", 77, 1.0) is r
    assert r.status is RequestStatus.FINISHED_LENGTH and r.output_token_ids == [77]
    assert r.finished_time == 1.0 and r.block_ids == []
    assert not s.has_work() and s.num_reserved == 0 and all_free(s)
    assert not s.schedule(2.0)


def test_stop_token_as_first_token_finishes_on_remote_kv_done() -> None:
    s = make()
    r = new_req("a", max_tokens=5, stop_token_ids=frozenset({9}))
    s.reserve(r, 0.0)
    assert s.remote_kv_done("a", 9, 1.0) is r
    assert r.status is RequestStatus.FINISHED_STOPPED and all_free(s)


def test_remote_kv_failed_frees_the_reservation() -> None:
    s = make()
    r = new_req("a")
    s.reserve(r, 0.0)
    assert s.remote_kv_failed("a", 1.0) is r
    assert r.status is RequestStatus.FINISHED_ERROR and r.finished_time == 1.0
    assert all_free(s) and s.num_reserved == 0
    assert s.remote_kv_failed("a", 1.1) is None
    assert s.remote_kv_done("a", 5, 1.2) is None  # a late completion does not resurrect it
    assert not s.has_work()


def test_expire_reservations() -> None:
    s = make(reservation_timeout_s=1.0)
    late, arrived = new_req("late"), new_req("arrived", max_tokens=3)
    s.reserve(late, 10.0)
    s.reserve(arrived, 10.0)
    s.remote_kv_done("arrived", 5, 10.5)
    assert s.expire_reservations(10.999) == []
    assert late.block_ids
    assert s.expire_reservations(11.0) == [late]
    assert late.status is RequestStatus.FINISHED_ERROR and late.block_ids == []
    assert arrived.block_ids and s.num_waiting == 1  # only the one whose KV never came
    assert s.expire_reservations(12.0) == []
    assert s.abort("arrived", 12.0) is arrived and all_free(s)


def test_renewed_reservation_lives_while_its_prefill_progresses_and_expires_once_it_stops() -> None:
    """A long prefill (its KV comes only with the last chunk) renews the reservation as it goes: past
    the timeout counted from the Reserve it is still held; once renewals stop (the prefill worker
    died or went silent), it expires one timeout after the last one."""
    s = make(reservation_timeout_s=1.0)
    long, idle = new_req("long", max_tokens=3), new_req("idle")
    s.reserve(long, 10.0)
    s.reserve(idle, 10.0)
    for now in (10.6, 11.2, 11.8):  # the prefill's progress, relayed by the router
        assert s.renew("long", now)
        assert [r.request_id for r in s.expire_reservations(now + 0.1)] == (["idle"] if now == 11.2 else [])
    assert s.expire_reservations(12.79) == [] and long.block_ids  # 3.5 timeouts after the Reserve
    assert s.remote_kv_done("long", 5, 12.7) is None and s.num_waiting == 1  # the KV came: it runs
    assert not s.renew("long", 12.8) and not s.renew("idle", 12.8)  # no reservation left to renew

    silent = new_req("silent")
    s.reserve(silent, 20.0)
    assert s.renew("silent", 20.9)
    assert s.renew("silent", 20.5)  # a late renewal never shortens it
    assert s.expire_reservations(21.89) == []
    assert s.expire_reservations(21.9) == [silent] and silent.block_ids == []  # the renewals stopped


def test_abort_reserved_and_running() -> None:
    s = make()
    model = FakeModel(s.block_manager)
    a, b = new_req("a", max_tokens=10), new_req("b", max_tokens=10)
    s.reserve(a, 0.0)
    s.reserve(b, 0.0)
    assert s.abort("a", 0.1) is a
    assert a.status is RequestStatus.FINISHED_ABORTED and a.block_ids == [] and s.num_reserved == 1
    assert s.remote_kv_done("a", 3, 0.2) is None
    model.transfer(s, b, 0.3)
    out = s.schedule(0.4)
    s.update(out, model.execute(out), 0.5)
    assert s.abort("b", 0.6) is b and b.status.finish_reason == "abort"
    assert s.abort("b", 0.6) is None
    assert not s.has_work() and all_free(s)


# ---- continuous batching -------------------------------------------------------------------
def test_continuous_batching_admits_and_removes_between_steps() -> None:
    s = make()
    model = FakeModel(s.block_manager)
    a = new_req("a", max_tokens=3)
    b = new_req("b", max_tokens=4)
    s.reserve(a, 0.0)
    model.transfer(s, a, 0.0)
    batches, finished = [], {}
    for step in range(6):
        now = float(step)
        if step == 1:
            s.reserve(b, now)
            model.transfer(s, b, now)  # arrives while a runs
        out = s.schedule(now)
        batches.append([c.request.request_id for c in out.chunks])
        for r in s.update(out, model.execute(out), now + 0.5):
            finished[r.request_id] = step
    assert batches == [["a"], ["a", "b"], ["b"], ["b"], [], []]
    assert finished == {"a": 1, "b": 3}
    assert a.output_token_ids == reference(a.prompt_token_ids, 3)
    assert b.output_token_ids == reference(b.prompt_token_ids, 4)
    assert all_free(s)


def test_batch_size_cap_without_adaptation() -> None:
    s = make(max_batch_size=3, max_num_seqs=10)
    model = FakeModel(s.block_manager)
    reqs = [new_req(f"r{i}", max_tokens=2) for i in range(5)]
    for r in reqs:
        assert s.reserve(r, 0.0)
        model.transfer(s, r, 0.0)
    out = s.schedule(1.0)
    assert [c.request.request_id for c in out.chunks] == ["r0", "r1", "r2"]
    s.update(out, model.execute(out), 1.5)  # all three finish (2 tokens)
    out = s.schedule(2.0)
    assert [c.request.request_id for c in out.chunks] == ["r3", "r4"]


@pytest.mark.parametrize("num_blocks", [256, 12])
def test_full_run_matches_reference_with_and_without_preemption(num_blocks: int) -> None:
    s = make(num_blocks=num_blocks, max_batch_size=6, max_num_seqs=12, max_num_batched_tokens=8)
    model = FakeModel(s.block_manager)
    pending = [new_req(f"r{i}", n=3 + i % 5, max_tokens=3 + (i * 7) % 9) for i in range(10)]
    reqs = list(pending)
    finished: dict[str, Request] = {}
    step = 0
    while pending or s.has_work() or s.num_reserved:
        now = step * 0.01
        while pending and s.reserve(pending[0], now):
            r = pending.pop(0)
            if (done := model.transfer(s, r, now)) is not None:
                finished[done.request_id] = done
        out = s.schedule(now)
        assert out.num_batched_tokens <= 8
        for r in s.update(out, model.execute(out), now + 0.005):
            finished[r.request_id] = r
        step += 1
        assert step < 2000
    assert {r.request_id: r.output_token_ids for r in finished.values()} == {
        r.request_id: reference(r.prompt_token_ids, r.max_tokens) for r in reqs
    }
    assert all_free(s)
    if num_blocks == 12:
        assert s.num_preemptions > 0  # recomputed locally, in chunks, and still correct


# ---- adaptive batch size -------------------------------------------------------------------
def _ready(s: DecodeScheduler, model: FakeModel, n: int, start: int, now: float) -> None:
    for i in range(start, start + n):
        r = new_req(f"r{i}", n=3, max_tokens=1000)
        assert s.reserve(r, now)
        model.transfer(s, r, now)


def test_adaptive_batch_grows_with_queue_depth() -> None:
    s = make(max_batch_size=64, max_num_seqs=256, min_batch_size=4, adaptive_batch=True)
    model = FakeModel(s.block_manager)
    assert s.running_limit() == 4
    _ready(s, model, 10, 0, 0.0)
    assert s.running_limit() == 10
    assert s.schedule(0.0).num_decode_seqs == 10
    _ready(s, model, 100, 10, 0.1)
    assert s.running_limit() == 64
    fixed = make(max_batch_size=64, max_num_seqs=256, min_batch_size=4)
    assert fixed.running_limit() == 64


def test_adaptive_batch_is_bounded_by_tpot_once_step_times_are_observed() -> None:
    s = make(
        num_blocks=1024,
        max_batch_size=64,
        max_num_seqs=256,
        min_batch_size=2,
        adaptive_batch=True,
        tpot_target_ms=10.5,
    )
    model = FakeModel(s.block_manager)

    def step(now: float) -> tuple[int, float]:
        out = s.schedule(now)
        dt = 0.001 + 0.001 * out.num_decode_seqs  # the modelled step time: 1 ms + 1 ms per sequence
        s.update(out, model.execute(out), now + dt)
        return out.num_decode_seqs, now + dt

    now = 3.7
    _ready(s, model, 2, 0, now)
    for _ in range(3):
        batch, now = step(now)
        assert batch == 2
    _ready(s, model, 4, 2, now)
    for _ in range(3):
        batch, now = step(now)
        assert batch == 6  # below the bound: grows with the queue
    _ready(s, model, 30, 6, now)
    limit = s.running_limit()
    assert limit == 9  # 1 ms + 9 x 1 ms <= 10.5 ms < 1 ms + 10 x 1 ms
    batch, now = step(now)
    assert batch == 9 and s.num_waiting == 27
    batch, now = step(now)
    assert batch == 9


def test_adaptive_batch_never_below_min_batch_size() -> None:
    s = make(max_batch_size=64, max_num_seqs=256, min_batch_size=4, adaptive_batch=True, tpot_target_ms=1.0)
    s._step_obs = [(1, 0.002), (2, 0.003)]  # even one sequence misses a 1 ms target
    assert s.running_limit() == 4
