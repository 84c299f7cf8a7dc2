"""ColocatedScheduler stepped by hand, and driven to completion by a fake model that reads its KV."""

import subprocess
import sys
import zlib

import pytest

from pdserve.config.engine import SchedulerConfig
from pdserve.sched import BlockManager, ColocatedScheduler, Request, RequestStatus, SchedulerOutput

BS = 4


def next_token(context: list[int]) -> int:
    """The fake model: a deterministic function of the whole context, like greedy decoding."""
    return zlib.crc32(repr(context).encode()) % 100 + 10


def reference(
    prompt: list[int], max_tokens: int, stop: frozenset[int] = frozenset(), min_tokens: int = 0
) -> list[int]:
    out: list[int] = []
    while True:
        t = next_token(prompt + out)
        out.append(t)
        if (t in stop and len(out) > min_tokens) or len(out) >= max_tokens:
            return out


class FakeModel:
    """Keeps a KV 'cache' of token ids per block slot; checks every chunk reads what was written."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.kv: dict[int, list[int | None]] = {}

    def _slot(self, req: Request, pos: int) -> tuple[int, int]:
        block = req.block_ids[pos // self.bm.block_size]
        assert self.bm.ref_count[block] > 0, "read/write through a block the request does not hold"
        return block, pos % self.bm.block_size

    def write(self, req: Request, start: int, n: int) -> None:
        tokens = req.all_token_ids
        for pos in range(start, start + n):
            block, off = self._slot(req, pos)
            row = self.kv.setdefault(block, [None] * self.bm.block_size)
            if self.bm.ref_count[block] > 1:
                assert row[off] == tokens[pos], "overwrote a shared (prefix-cached) block"
            row[off] = tokens[pos]

    def read(self, req: Request, n: int) -> list[int | None]:
        out = []
        for pos in range(n):
            block, off = self._slot(req, pos)
            out.append(self.kv.get(block, [None] * self.bm.block_size)[off])
        return out

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        sampled = {}
        for c in out.chunks:
            req = c.request
            assert c.start + c.num_tokens <= req.num_tokens
            assert len(req.block_ids) * self.bm.block_size >= c.start + c.num_tokens
            assert self.read(req, c.start) == req.all_token_ids[: c.start], "context KV missing or wrong"
            self.write(req, c.start, c.num_tokens)
            if c.sample:
                assert c.start + c.num_tokens == req.num_tokens
                sampled[req.request_id] = next_token(self.read(req, req.num_tokens))
        return sampled


def make(
    num_blocks: int = 64,
    budget: int = 64,
    max_seqs: int = 8,
    chunked: bool = True,
    caching: bool = True,
    eviction: str = "lru",
) -> ColocatedScheduler:
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=caching, eviction=eviction)
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_seqs, enable_chunked_prefill=chunked
    )
    return ColocatedScheduler(cfg, bm)


def new_req(rid: str, prompt: list[int], max_tokens: int, **kw) -> Request:
    return Request(rid, list(prompt), max_tokens=max_tokens, arrival_time=0.0, **kw)


def run(sched: ColocatedScheduler, arrivals: list[tuple[int, Request]], max_steps: int = 5000):
    """Step until done; `arrivals` are (step, request). Returns finished requests by id."""
    bm = sched.block_manager
    model = FakeModel(bm)
    pending = sorted(arrivals, key=lambda a: a[0])
    finished: dict[str, Request] = {}
    step = 0
    while pending or sched.has_work():
        now = step * 0.01
        while pending and pending[0][0] <= step:
            sched.add_request(pending.pop(0)[1], now)
        out = sched.schedule(now)
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert len({c.request.request_id for c in out.chunks}) == len(out.chunks)
        assert sched.num_running <= sched.config.max_num_seqs
        decodes = [i for i, c in enumerate(out.chunks) if c.request.output_token_ids and c.num_tokens == 1]
        prefills = [i for i, c in enumerate(out.chunks) if i not in decodes]
        if decodes and prefills:
            assert max(decodes) < min(prefills), "decodes must come before prefill chunks"
        for r in sched.update(out, model.execute(out), now + 0.005):
            assert r.status.is_finished and r.block_ids == []
            finished[r.request_id] = r
        in_use = sum(1 for c in bm.ref_count if c > 0)
        assert in_use + bm.num_free_blocks == bm.num_blocks
        step += 1
        assert step < max_steps, "no progress"
    assert bm.num_free_blocks == bm.num_blocks
    assert all(c == 0 for c in bm.ref_count)
    return finished


def workload(n: int = 12, seed: int = 0) -> list[tuple[int, Request]]:
    shared = [7] * 9  # a common system prompt, so prefix caching has something to hit
    out = []
    for i in range(n):
        rnd = zlib.crc32(f"{seed}-{i}".encode())
        plen = 3 + rnd % 40
        prompt = (shared if i % 2 else []) + [(rnd >> k) % 50 + 1 for k in range(plen)]
        stop = frozenset({(rnd % 100) + 10}) if i % 3 == 0 else frozenset()
        out.append(
            (
                i // 3,
                new_req(
                    f"r{i}",
                    prompt,
                    max_tokens=1 + rnd % 12,
                    stop_token_ids=stop,
                    min_tokens=2 if i % 3 == 0 else 0,
                ),
            )
        )
    return out


def expected(arrivals: list[tuple[int, Request]]) -> dict[str, list[int]]:
    return {
        r.request_id: reference(r.prompt_token_ids, r.max_tokens, r.stop_token_ids, r.min_tokens)
        for _, r in arrivals
    }


# ---- chunking, ordering, limits ------------------------------------------------------------
def test_long_prompt_is_chunked_across_steps_and_samples_only_at_the_end() -> None:
    s = make(budget=32)
    r = new_req("a", range(100), max_tokens=3)
    s.add_request(r, 0.0)
    starts, sizes, samples = [], [], []
    model = FakeModel(s.block_manager)
    for step in range(4):
        out = s.schedule(step)
        assert len(out.chunks) == 1 and out.chunks[0].request is r
        c = out.chunks[0]
        starts.append(c.start)
        sizes.append(c.num_tokens)
        samples.append(c.sample)
        assert out.num_prefill_tokens == c.num_tokens and out.num_decode_seqs == 0
        s.update(out, model.execute(out), step)
    assert starts == [0, 32, 64, 96]
    assert sizes == [32, 32, 32, 4]
    assert samples == [False, False, False, True]
    assert len(r.output_token_ids) == 1 and r.first_token_time == 3
    assert r.first_scheduled_time == 0
    out = s.schedule(4)
    assert [(c.num_tokens, c.sample) for c in out.chunks] == [(1, True)]
    assert out.num_decode_seqs == 1 and out.num_prefill_tokens == 0


def test_without_chunked_prefill_a_prompt_over_budget_waits() -> None:
    s = make(budget=32, chunked=False)
    s.add_request(new_req("long", range(40), max_tokens=1), 0.0)
    assert not s.schedule(0.0)
    assert s.num_waiting == 1 and s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_decodes_come_before_prefill_chunks() -> None:
    s = make(budget=16)
    model = FakeModel(s.block_manager)
    a = new_req("a", range(40), max_tokens=5)  # admitted first, long: still prefilling
    b = new_req("b", range(100, 103), max_tokens=5)
    s.add_request(a, 0.0)
    s.add_request(b, 0.0)
    out = s.schedule(0.0)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 16)]
    s.update(out, model.execute(out), 0.0)
    s2 = s.schedule(1.0)
    assert [(c.request.request_id, c.num_tokens, c.sample) for c in s2.chunks] == [("a", 16, False)]
    s.update(s2, model.execute(s2), 1.0)
    out = s.schedule(2.0)  # a needs 8 more, b's 3-token prompt fits in the rest
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 8), ("b", 3)]
    s.update(out, model.execute(out), 2.0)
    assert not a.is_prefill and not b.is_prefill  # both decoding now
    c = new_req("c", range(200, 260), max_tokens=2)
    s.add_request(c, 3.0)
    out = s.schedule(3.0)
    assert [(x.request.request_id, x.num_tokens, x.sample) for x in out.chunks] == [
        ("a", 1, True),
        ("b", 1, True),
        ("c", 14, False),
    ]
    assert out.num_decode_seqs == 2 and out.num_prefill_tokens == 14


def test_max_num_seqs_limits_running_and_admits_when_one_finishes() -> None:
    s = make(max_seqs=2)
    model = FakeModel(s.block_manager)
    reqs = [
        new_req("a", [1, 2], max_tokens=1),
        new_req("b", [3, 4], max_tokens=3),
        new_req("c", [5, 6], max_tokens=1),
    ]
    for r in reqs:
        s.add_request(r, 0.0)
    out = s.schedule(0.0)
    assert [c.request.request_id for c in out.chunks] == ["a", "b"]
    assert s.num_running == 2 and s.num_waiting == 1
    done = s.update(out, model.execute(out), 0.0)
    assert [r.request_id for r in done] == ["a"]  # max_tokens=1: finished by its first token
    out = s.schedule(1.0)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("b", 1), ("c", 2)]


# ---- update: stop conditions ---------------------------------------------------------------
def _step(s: ColocatedScheduler, token: int, now: float) -> list[Request]:
    out = s.schedule(now)
    return s.update(out, {c.request.request_id: token for c in out.chunks if c.sample}, now)


def test_finishes_on_max_tokens() -> None:
    s = make()
    r = new_req("a", [1, 2, 3], max_tokens=3)
    s.add_request(r, 0.0)
    assert _step(s, 11, 0.0) == [] and _step(s, 12, 1.0) == []
    assert _step(s, 13, 2.0) == [r]
    assert r.output_token_ids == [11, 12, 13]
    assert r.status is RequestStatus.FINISHED_LENGTH and r.status.finish_reason == "length"
    assert r.finished_time == 2.0 and r.first_token_time == 0.0
    assert not s.has_work() and "a" not in s.requests
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_finishes_on_stop_token_but_not_before_min_tokens() -> None:
    s = make()
    r = new_req("a", [1, 2, 3], max_tokens=10, stop_token_ids=frozenset({50}), min_tokens=2)
    s.add_request(r, 0.0)
    assert _step(s, 50, 0.0) == []  # 1 token < min_tokens: stop ignored
    assert _step(s, 50, 1.0) == []  # 2 tokens == min_tokens: still ignored (must exceed)
    assert _step(s, 12, 2.0) == []
    assert _step(s, 50, 3.0) == [r]
    assert r.output_token_ids == [50, 50, 12, 50]
    assert r.status is RequestStatus.FINISHED_STOPPED and r.status.finish_reason == "stop"
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_stop_token_at_first_sample_finishes_at_once() -> None:
    s = make()
    r = new_req("a", [1, 2, 3], max_tokens=10, stop_token_ids=frozenset({50}))
    s.add_request(r, 0.0)
    assert _step(s, 50, 0.0) == [r]
    assert r.status is RequestStatus.FINISHED_STOPPED


# ---- preemption ----------------------------------------------------------------------------
def test_preemption_by_recompute_of_the_newest_request() -> None:
    s = make(num_blocks=4, caching=False)
    model = FakeModel(s.block_manager)
    a = new_req("a", range(1, 8), max_tokens=3)
    b = new_req("b", range(11, 18), max_tokens=4)
    s.add_request(a, 0.0)
    s.add_request(b, 0.0)
    for step in range(2):  # prefill both (2 blocks each), then one decode: 8 tokens each, all blocks used
        out = s.schedule(step)
        assert not out.preempted
        s.update(out, model.execute(out), step)
    assert s.block_manager.num_free_blocks == 0
    late = new_req("late", [1], max_tokens=1)
    s.add_request(late, 2.0)
    out = s.schedule(2.0)  # a needs a 3rd block: b (newest) is preempted
    assert out.preempted == [b]
    assert [c.request for c in out.chunks] == [a]
    assert b.status is RequestStatus.PREEMPTED and b.block_ids == [] and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and s.num_preemptions == 1
    assert list(s.waiting) == [b, late]  # front of the queue, ahead of newer arrivals
    assert s.running == [a]
    assert len(b.output_token_ids) == 2
    finished = {r.request_id: r for r in s.update(out, model.execute(out), 2.0)}
    assert "a" in finished and finished["a"].output_token_ids == reference(a.prompt_token_ids, 3)
    out = s.schedule(3.0)  # b recomputed from prompt + its 2 tokens so far
    assert out.chunks[0].request is b
    assert (out.chunks[0].start, out.chunks[0].num_tokens, out.chunks[0].sample) == (0, 9, True)
    assert b.status is RequestStatus.RUNNING
    for r in s.update(out, model.execute(out), 3.0):
        finished[r.request_id] = r
    step = 4
    while s.has_work():
        out = s.schedule(step)
        for r in s.update(out, model.execute(out), step):
            finished[r.request_id] = r
        step += 1
    assert finished["b"].output_token_ids == reference(b.prompt_token_ids, 4)
    assert len(finished["b"].output_token_ids) == 4
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_request_preempts_itself_when_nothing_else_can_give_way() -> None:
    s = make(num_blocks=2, caching=False)
    model = FakeModel(s.block_manager)
    a = new_req("a", range(1, 8), max_tokens=5)
    s.add_request(a, 0.0)
    for step in range(2):
        out = s.schedule(step)
        s.update(out, model.execute(out), step)
    out = s.schedule(2.0)  # needs a 3rd block; it is alone
    assert out.preempted == [a] and not out.chunks
    assert a.status is RequestStatus.PREEMPTED and list(s.waiting) == [a]
    assert s.block_manager.num_free_blocks == 2


# ---- abort ---------------------------------------------------------------------------------
def test_abort_running_waiting_and_mid_step() -> None:
    s = make(max_seqs=2)
    model = FakeModel(s.block_manager)
    a, b, c = (new_req(x, range(10), max_tokens=5) for x in "abc")
    for r in (a, b, c):
        s.add_request(r, 0.0)
    out = s.schedule(0.0)
    s.update(out, model.execute(out), 0.0)
    assert s.num_running == 2 and s.num_waiting == 1
    assert s.abort("c", 1.0) is c  # waiting
    assert c.status is RequestStatus.FINISHED_ABORTED and c.finished_time == 1.0
    assert s.abort("a", 1.0) is a  # running
    assert a.block_ids == [] and a.status.finish_reason == "abort"
    assert s.abort("a", 1.0) is None and s.abort("nope", 1.0) is None
    out = s.schedule(2.0)
    assert [x.request for x in out.chunks] == [b]
    sampled = model.execute(out)
    assert s.abort("b", 2.5) is b  # aborted while the step runs
    assert s.update(out, sampled, 3.0) == []
    assert b.output_token_ids == a.output_token_ids[:1] and len(b.output_token_ids) == 1
    assert not s.has_work()
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_finish_from_outside_sets_status() -> None:
    s = make()
    r = new_req("a", [1, 2], max_tokens=5)
    s.add_request(r, 0.0)
    _step(s, 20, 0.0)
    assert s.finish("a", RequestStatus.FINISHED_STOPPED, 1.0) is r
    assert r.status.finish_reason == "stop" and r.block_ids == []
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


# ---- full runs: the policy never changes what is computed ----------------------------------
CONFIGS = {
    "roomy": dict(num_blocks=256, budget=512, max_seqs=32),
    "chunked": dict(num_blocks=256, budget=7, max_seqs=32),
    "one-seq": dict(num_blocks=256, budget=64, max_seqs=1),
    "tight-lru": dict(num_blocks=16, budget=16, max_seqs=8),
    "tight-fifo": dict(num_blocks=16, budget=16, max_seqs=8, eviction="fifo"),
    "tight-nocache": dict(num_blocks=16, budget=16, max_seqs=8, caching=False),
    "tight-unchunked": dict(num_blocks=16, budget=64, max_seqs=8, chunked=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_run_matches_reference(name: str) -> None:
    arrivals = workload(12, seed=1)
    s = make(**CONFIGS[name])
    finished = run(s, arrivals)
    want = expected(arrivals)
    assert {k: v.output_token_ids for k, v in finished.items()} == want
    for r in finished.values():
        assert r.status in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED)
        assert r.first_scheduled_time is not None and r.first_token_time is not None
    if name.startswith("tight"):
        assert s.num_preemptions > 0, "scenario meant to exercise preemption"
    if name == "chunked":
        assert s.num_preemptions == 0


def test_prefix_cache_hits_in_a_full_run() -> None:
    arrivals = [(i, new_req(f"r{i}", [5] * 12 + [i + 1], max_tokens=3)) for i in range(4)]
    s = make(num_blocks=64, budget=64)
    finished = run(s, arrivals)
    assert {k: v.output_token_ids for k, v in finished.items()} == expected(arrivals)
    assert [finished[f"r{i}"].num_cached_tokens for i in range(4)] == [0, 12, 12, 12]
    assert s.block_manager.hits >= 9


def test_import_does_not_pull_torch() -> None:
    code = "import sys, pdserve.sched, pdserve.config.engine; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
