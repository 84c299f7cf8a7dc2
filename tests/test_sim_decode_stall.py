"""A decode instance under KV thrash must not stall for good: ready requests run before a preempted
one that waits for their blocks (the policy), and the simulated instance schedules again after a
step that only preempted, as the real engine thread does (the simulator)."""

from __future__ import annotations

from collections import defaultdict

from pdserve.config.engine import DecodeConfig
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.decode import DecodeScheduler
from pdserve.sched.request import Request, RequestStatus
from pdserve.sim.events import EventLoop
from pdserve.sim.instance import SimInstance
from pdserve.sim.network import Port
from tests.test_sim import FixedModel

ZEROS: defaultdict[str, int] = defaultdict(int)


def _policy(num_blocks: int, max_batch_size: int = 4) -> DecodeScheduler:
    cfg = DecodeConfig(max_batch_size=max_batch_size, max_num_seqs=4, min_batch_size=1)
    return DecodeScheduler(cfg, BlockManager(num_blocks, 4, False))


def _ready(policy: DecodeScheduler, rid: str, prompt: int, max_tokens: int, now: float) -> Request:
    """Reserve, and land the KV at once: the request waits, ready, holding its blocks."""
    req = Request(rid, [1] * prompt, max_tokens, now)
    assert policy.reserve(req, now)
    assert policy.remote_kv_done(rid, 0, now) is None
    return req


def _step(policy: DecodeScheduler, now: float) -> list[Request]:
    out = policy.schedule(now)
    return policy.update(out, ZEROS, now) if out.chunks else []


def test_ready_requests_run_before_a_preempted_one_that_waits_for_their_blocks() -> None:
    # 10 blocks of 4 tokens. A (23-token prompt) runs alone; B and C reserve the rest while it runs;
    # A outgrows what is left and preempts itself; B's and C's KV lands. A's recompute needs 8
    # blocks, 7 are free: first in line, it would wait for B's and C's blocks forever.
    p = _policy(10)
    a = _ready(p, "a", 23, 12, 0.0)
    _step(p, 0.0)
    for rid, n in (("b", 7), ("c", 3)):
        req = Request(rid, [1] * n, 3, 0.0)
        assert p.reserve(req, 0.0)
    t = 0.0
    while a.status is RequestStatus.RUNNING:
        t += 0.01
        _step(p, t)
    assert a.status is RequestStatus.PREEMPTED and not p.running
    for rid in ("b", "c"):
        p.remote_kv_done(rid, 0, t)
    assert [r.request_id for r in p.waiting] == ["a", "b", "c"]
    done: list[str] = []
    for _ in range(200):
        t += 0.01
        done += [r.request_id for r in _step(p, t)]
        if not p.has_work():
            break
    assert sorted(done) == ["a", "b", "c"]  # B and C ran first, then A had the memory


def test_the_simulated_instance_schedules_again_after_a_step_that_only_preempted() -> None:
    # 4 blocks, one sequence per step. A runs; B waits ready (the batch is full) holding a block;
    # A outgrows the free blocks and preempts itself: that step computes nothing. The engine thread
    # polls again and B runs; a simulated instance that went idle there would never wake up.
    p = _policy(4, max_batch_size=1)
    loop = EventLoop()
    finished: list[str] = []
    inst = SimInstance("d0", "decode", p, FixedModel(), Port("d0", 1e9))
    inst.attach(loop, lambda _i, _o, fin, _t: finished.extend(r.request_id for r in fin))
    _ready(p, "a", 7, 8, 0.0)
    inst.kick(0.0)
    loop.run(until=0.005)  # A's first step is in flight
    _ready(p, "b", 3, 3, 0.005)
    loop.run()
    assert p.num_preemptions >= 1
    assert sorted(finished) == ["a", "b"] and not p.has_work()


def test_a_request_that_outgrows_the_whole_cache_alone_does_not_spin_the_simulator() -> None:
    # 4 blocks of 4 tokens: 7 prompt + 20 output tokens never fit. Alone, it preempts itself each
    # time it fills the cache (recomputing in 4-token chunks, each of which fits); the simulator
    # stops there instead of polling forever.
    cfg = DecodeConfig(max_batch_size=1, max_num_seqs=4, min_batch_size=1, max_num_batched_tokens=4)
    p = DecodeScheduler(cfg, BlockManager(4, 4, False))
    loop = EventLoop()
    inst = SimInstance("d0", "decode", p, FixedModel(), Port("d0", 1e9))
    inst.attach(loop, lambda *_: None)
    _ready(p, "a", 7, 20, 0.0)
    inst.kick(0.0)
    loop.run(until=60.0)
    assert p.num_preemptions >= 1 and len(loop) == 0 and p.has_work()
