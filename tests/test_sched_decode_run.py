"""decode_run_length / advance_decode: a run of decode steps applied at once equals stepping it.

The simulator leans on this to skip most of its events, so "equal" here means the whole policy
state: tokens, computed counts, block tables (to the block id), the prefix cache, the free list,
what finishes and when, and the decode role's step observations.
"""

import copy
import random

import pytest

from pdserve.config.engine import DecodeConfig, SchedulerConfig
from pdserve.sched import BlockManager, ColocatedScheduler, DecodeScheduler, Request

TOKEN = 7  # what every step samples


class _Const(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> int:
        return TOKEN


SAMPLED = _Const()


def _state(policy: ColocatedScheduler) -> dict[str, object]:
    bm = policy.block_manager
    reqs = sorted(policy.requests.values(), key=lambda r: r.request_id)
    state: dict[str, object] = {
        "reqs": [(r.request_id, r.num_computed_tokens, list(r.output_token_ids), list(r.block_ids),
                  r.status, r.finished_time) for r in reqs],
        "running": [r.request_id for r in policy.running],
        "free": list(bm._free),
        "ref": list(bm.ref_count),
        "hash": dict(bm.hash_to_block),
        "lru": list(bm._lru),
        "evictable": bm._evictable,
    }
    if isinstance(policy, DecodeScheduler):
        state["obs"] = list(policy._step_obs)
        state["last"] = policy._last_step
    return state


def _colocated(seed: int, caching: bool, num_blocks: int = 400) -> ColocatedScheduler:
    rng = random.Random(seed)
    policy = ColocatedScheduler(SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=16),
                                BlockManager(num_blocks, 4, enable_prefix_caching=caching))
    shared = [rng.randrange(100) for _ in range(12)]  # a common prefix: the cache has work to do
    for i in range(6):
        prompt = shared + [rng.randrange(100) for _ in range(rng.randrange(1, 40))]
        policy.add_request(Request(f"r{i}", prompt, rng.randrange(20, 80), 0.0), 0.0)
    t = 0.0
    while policy.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in policy.running):
        out = policy.schedule(t)
        t += 0.01
        policy.update(out, SAMPLED, t)
    return policy


def _decode(seed: int, adaptive: bool) -> DecodeScheduler:
    rng = random.Random(seed)
    cfg = DecodeConfig(max_batch_size=16, max_num_seqs=32, adaptive_batch=adaptive,
                       tpot_target_ms=50.0 if adaptive else 0.0, min_batch_size=2)
    policy = DecodeScheduler(cfg, BlockManager(300, 4, enable_prefix_caching=False))
    for i in range(5):
        req = Request(f"d{i}", [rng.randrange(100) for _ in range(rng.randrange(3, 50))],
                      rng.randrange(10, 60), 0.0)
        assert policy.reserve(req, 0.0)
        policy.remote_kv_done(req.request_id, TOKEN, 0.0)
    t = 0.0
    for _ in range(3):  # admit them and take a few steps, so there are observations
        out = policy.schedule(t)
        t += 0.02
        policy.update(out, SAMPLED, t)
    return policy


def _step_by_step(policy: ColocatedScheduler, ends: list[float], start: float) -> list[str]:
    finished: list[str] = []
    t = start
    for end in ends:
        out = policy.schedule(t)
        assert out.num_decode_seqs == len(out.chunks) and not out.preempted
        finished += [r.request_id for r in policy.update(out, SAMPLED, end)]
        t = end
    return finished


def _as_run(policy: ColocatedScheduler, ends: list[float], start: float) -> list[str]:
    policy.advance_decode(TOKEN, ends[:-1], start)
    out = policy.schedule(ends[-2] if len(ends) > 1 else start)
    return [r.request_id for r in policy.update(out, SAMPLED, ends[-1])]


def _check_run(policy: ColocatedScheduler, limit: int = 10_000) -> int:
    k = policy.decode_run_length(TOKEN, limit)
    assert k >= 2
    ends = [1.0 + 0.013 * (m + 1) + 1e-5 * m * m for m in range(k)]  # uneven step times
    a, b = copy.deepcopy(policy), copy.deepcopy(policy)
    fin_a = _step_by_step(a, ends, 1.0)
    fin_b = _as_run(b, ends, 1.0)
    assert fin_a == fin_b
    assert _state(a) == _state(b)
    return k


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_colocated_run_equals_steps(seed: int, caching: bool) -> None:
    policy = _colocated(seed, caching)
    k = _check_run(policy)
    # The run ends exactly at the first request to reach max_tokens.
    assert k == min(r.max_tokens - len(r.output_token_ids) for r in policy.running)
    _check_run(policy, limit=5)  # a shorter limit: nobody finishes in it


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_decode_role_run_equals_steps(seed: int, adaptive: bool) -> None:
    _check_run(_decode(seed, adaptive))


@pytest.mark.parametrize("num_blocks", [64, 80, 96])
def test_run_stops_where_blocks_run_out(num_blocks: int) -> None:
    """With few free blocks the run ends at the last step whose blocks are free, before any request
    reaches max_tokens (these sizes are chosen so that the blocks, not max_tokens, bind)."""
    policy = _colocated(1, False, num_blocks=num_blocks)
    free = policy.block_manager.num_free_blocks
    bs = policy.block_manager.block_size

    def need(steps: int) -> int:
        return sum(max(0, -(-(r.num_computed_tokens + steps) // bs) - len(r.block_ids)) for r in policy.running)

    to_max_tokens = min(r.max_tokens - len(r.output_token_ids) for r in policy.running)
    assert need(to_max_tokens) > free  # the case under test: blocks run out first
    k = policy.decode_run_length(TOKEN, 10_000)
    assert 2 <= k < to_max_tokens
    assert need(k) <= free < need(k + 1)
    _check_run(policy)


def test_no_run_when_something_could_change() -> None:
    policy = _colocated(2, False)
    assert policy.decode_run_length(TOKEN, 100) >= 2
    # A request waiting to be admitted: the next step is not a plain decode step.
    policy.add_request(Request("late", [1, 2, 3], 5, 2.0), 2.0)
    assert policy.decode_run_length(TOKEN, 100) == 0
    policy = _colocated(2, False)
    # A token that would stop a request.
    next(iter(policy.running)).stop_token_ids = frozenset({TOKEN})
    assert policy.decode_run_length(TOKEN, 100) == 0
    assert policy.decode_run_length(TOKEN + 1, 100) >= 2


def test_no_run_while_a_prompt_has_one_token_left() -> None:
    """A chunk of one prompt token looks like a decode step but samples the first token."""
    policy = ColocatedScheduler(SchedulerConfig(max_num_batched_tokens=100), BlockManager(100, 4, False))
    policy.add_request(Request("a", list(range(100)), 30, 0.0), 0.0)
    policy.add_request(Request("b", list(range(100)), 30, 0.0), 0.0)
    for t in (0.1, 0.2):  # a: whole prompt; then a decodes and b gets 99 of its 100 tokens
        policy.update(policy.schedule(t - 0.1), SAMPLED, t)
    b = policy.requests["b"]
    assert b.num_computed_tokens == 99 and not b.output_token_ids
    assert policy.decode_run_length(TOKEN, 100) == 0
    policy.update(policy.schedule(0.2), SAMPLED, 0.3)
    assert policy.decode_run_length(TOKEN, 100) >= 2
