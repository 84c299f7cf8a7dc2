"""PrefillBatcher stepped by hand: when a batch starts, what it holds, and what it frees."""

import pytest

from pdserve.config.engine import PrefillConfig
from pdserve.sched import BlockManager, PrefillBatcher, Request, RequestStatus

BS = 4


def make(num_blocks: int = 1024, caching: bool = True, **cfg) -> PrefillBatcher:
    cfg.setdefault("max_batch_tokens", 1000)
    return PrefillBatcher(PrefillConfig(**cfg), BlockManager(num_blocks, BS, enable_prefix_caching=caching))


def new_req(rid: str, n: int, base: int = 0) -> Request:
    return Request(rid, [base + i % 97 + 1 for i in range(n)], max_tokens=8, arrival_time=0.0)


def ids(out) -> list[str]:
    return [c.request.request_id for c in out.chunks]


def test_batch_starts_at_the_utilization_target() -> None:
    p = make(target_utilization=0.5, max_wait_ms=1e6)
    p.add_request(new_req("a", 300), 0.0)
    p.add_request(new_req("b", 199), 0.0)
    assert p.queued_tokens == 499
    assert not p.schedule(0.0)  # 499 < 0.5 * 1000
    assert p.num_waiting == 2
    p.add_request(new_req("c", 1), 0.0)
    out = p.schedule(0.0)
    assert ids(out) == ["a", "b", "c"]
    assert all(c.sample for c in out.chunks)
    assert [c.num_tokens for c in out.chunks] == [300, 199, 1]
    assert p.num_waiting == 0 and p.num_running == 3
    assert all(c.request.status is RequestStatus.RUNNING for c in out.chunks)


@pytest.mark.parametrize("t0", [0.0, 0.3, 2.3, 100.1, 12345.678])
def test_max_wait_rule_and_next_wakeup(t0: float) -> None:
    p = make(max_wait_ms=50)
    assert p.next_wakeup(t0) is None
    p.add_request(new_req("a", 10), t0)
    assert p.next_wakeup(t0) == t0 + 0.050
    assert not p.schedule(t0 + 0.049)
    # A worker (or the simulator) that sleeps until next_wakeup must find the batch ready.
    out = p.schedule(p.next_wakeup(t0 + 0.049))
    assert ids(out) == ["a"]
    assert out.chunks[0].request.first_scheduled_time == t0 + 0.050
    assert p.next_wakeup(t0 + 0.05) is None


def test_next_wakeup_is_the_oldest_head_across_buckets() -> None:
    p = make(max_wait_ms=20, length_buckets=[64])
    p.add_request(new_req("long", 100), 1.0)
    p.add_request(new_req("short", 10), 1.005)
    p.add_request(new_req("short2", 10), 1.001)
    assert p.next_wakeup(1.01) == pytest.approx(1.02)
    out = p.schedule(1.02)
    assert ids(out) == ["long"]
    assert p.next_wakeup(1.02) == pytest.approx(1.025)


def test_max_num_seqs_starts_and_caps_a_batch() -> None:
    p = make(max_num_seqs=3, max_wait_ms=1e6)
    for i in range(4):
        p.add_request(new_req(f"r{i}", 5), 0.0)
    out = p.schedule(0.0)
    assert ids(out) == ["r0", "r1", "r2"]
    assert not p.schedule(0.0)  # one left, far below the target


def test_length_buckets_keep_short_prompts_from_waiting_on_long_ones() -> None:
    def scenario(buckets: list[int]) -> list[list[str]]:
        p = make(length_buckets=buckets, target_utilization=0.85, max_wait_ms=50)
        p.add_request(new_req("L", 600), 0.0)
        for i in range(9):
            p.add_request(new_req(f"S{i}", 100), 0.001)
        batches = []
        for now in (0.002, 0.003, 0.060):
            out = p.schedule(now)
            if out:
                batches.append(ids(out))
        return batches

    one_queue = scenario([])
    assert one_queue[0] == ["L", "S0", "S1", "S2", "S3"]  # shorts ride behind the long prompt
    bucketed = scenario([128])
    assert bucketed[0] == [f"S{i}" for i in range(9)]  # the short bucket fills and goes alone
    assert bucketed[1] == ["L"]  # the long one goes at its max wait


def test_bucket_boundaries() -> None:
    p = make(length_buckets=[8, 16])
    for n in (1, 8, 9, 16, 17, 1000):
        p.add_request(new_req(f"n{n}", n), 0.0)
    assert [[r.request_id for r in q] for q in p.queues] == [["n1", "n8"], ["n9", "n16"], ["n17", "n1000"]]


def test_packing_without_padding_and_accounting() -> None:
    p = make(max_wait_ms=0)
    for rid, n in (("a", 100), ("b", 30), ("c", 50)):
        p.add_request(new_req(rid, n, base=len(rid) * 1000 + n), 0.0)
    out = p.schedule(0.0)
    assert [c.num_tokens for c in out.chunks] == [100, 30, 50]  # each exactly its own length
    assert out.num_batched_tokens == 180
    assert (p.packed_tokens, p.padded_tokens) == (180, 300)
    p.add_request(new_req("d", 7, base=9), 1.0)
    p.schedule(1.0)
    assert (p.packed_tokens, p.padded_tokens) == (187, 307)


def test_batch_respects_budget_but_always_takes_the_head() -> None:
    p = make(max_batch_tokens=100, max_wait_ms=0)
    p.add_request(new_req("huge", 250), 0.0)
    p.add_request(new_req("small", 10), 0.0)
    assert ids(p.schedule(0.0)) == ["huge"]
    for rid, n in (("a", 60), ("b", 40), ("c", 1)):
        p.add_request(new_req(rid, n, base=n), 1.0)
    out = p.schedule(1.0)
    assert ids(out) == ["small", "a"]  # 10 + 60; b (40) would exceed 100
    assert ids(p.schedule(1.0)) == ["b", "c"]


def test_update_records_first_token_and_release_frees_blocks() -> None:
    p = make(num_blocks=64, max_wait_ms=0)
    bm = p.block_manager
    r = new_req("a", 10)
    p.add_request(r, 0.0)
    out = p.schedule(0.0)
    assert len(r.block_ids) == 3 and bm.num_free_blocks == 61
    done = p.update(out, {"a": 42}, 0.2)
    assert done == [r]
    assert r.output_token_ids == [42] and r.first_token_time == 0.2
    assert r.num_computed_tokens == 10
    assert p.num_running == 1 and not p.has_work()  # held for the transfer
    assert bm.num_free_blocks == 61
    p.release(r, 0.5)
    assert p.num_running == 0 and r.block_ids == []
    assert r.status is RequestStatus.FINISHED_STOPPED and r.finished_time == 0.5
    assert bm.num_free_blocks == bm.num_blocks
    p.release(r, 0.6)  # a second release is harmless
    assert r.finished_time == 0.5


def test_prefix_cache_reuse_between_batches() -> None:
    p = make(max_wait_ms=0)
    a = new_req("a", 40)
    p.add_request(a, 0.0)
    out = p.schedule(0.0)
    p.update(out, {"a": 1}, 0.0)
    p.release(a, 0.1)
    b = new_req("b", 41)  # same first 40 tokens
    p.add_request(b, 0.2)
    out = p.schedule(0.2)
    assert b.num_cached_tokens == 40
    assert (out.chunks[0].start, out.chunks[0].num_tokens) == (40, 1)
    assert p.packed_tokens == 41


def test_blocks_exhausted_stops_the_batch_and_leaks_nothing() -> None:
    p = make(num_blocks=10, max_wait_ms=0)
    bm = p.block_manager
    a, b = new_req("a", 24), new_req("b", 24, base=50)  # 6 blocks each
    p.add_request(a, 0.0)
    p.add_request(b, 0.0)
    out = p.schedule(0.0)
    assert ids(out) == ["a"]
    assert b.block_ids == [] and b.status is RequestStatus.WAITING
    assert bm.num_free_blocks == 4
    assert not p.schedule(0.1)  # still no room
    # b's timer has fired and only a release can help: no wake-up time, so no caller spins.
    assert p.next_wakeup(0.1) is None
    p.update(out, {"a": 5}, 0.1)
    p.release(a, 0.2)
    assert ids(p.schedule(0.3)) == ["b"]
    p.release(b, 0.4)
    assert bm.num_free_blocks == bm.num_blocks


def test_abort_in_queue_and_in_transfer() -> None:
    p = make(max_wait_ms=50)
    bm = p.block_manager
    q, t = new_req("queued", 10), new_req("moving", 10, base=20)
    p.add_request(t, 0.0)
    out = p.schedule(0.05)
    p.update(out, {"moving": 3}, 0.06)
    p.add_request(q, 0.07)
    assert p.abort("queued", 0.08) is q
    assert q.status is RequestStatus.FINISHED_ABORTED and q.finished_time == 0.08
    assert p.num_waiting == 0 and p.next_wakeup(0.08) is None
    assert p.abort("moving", 0.09) is t
    assert t.status is RequestStatus.FINISHED_ABORTED and t.block_ids == []
    assert p.num_running == 0
    assert p.abort("unknown", 0.1) is None
    assert bm.num_free_blocks == bm.num_blocks


def test_abort_while_the_batch_computes_is_skipped_by_update() -> None:
    p = make(max_wait_ms=0)
    a, b = new_req("a", 10), new_req("b", 10, base=30)
    p.add_request(a, 0.0)
    p.add_request(b, 0.0)
    out = p.schedule(0.0)
    p.abort("a", 0.01)
    done = p.update(out, {"a": 1, "b": 2}, 0.02)
    assert done == [b] and a.output_token_ids == []
    p.release(b, 0.03)
    assert p.block_manager.num_free_blocks == p.block_manager.num_blocks


def test_by_default_a_lone_prompt_on_an_idle_worker_starts_at_once() -> None:
    """Idle TTFT: the default batcher adds no wait a colocated worker would not (issue 12)."""
    p = PrefillBatcher(PrefillConfig(), BlockManager(1024, BS))
    p.add_request(new_req("a", 10), 5.0)
    assert ids(p.schedule(5.0)) == ["a"]
    assert p.next_wakeup(5.0) is None
