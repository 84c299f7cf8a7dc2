"""Load-aware and prefix-aware placement, pure and stepped by hand: the policy's balance, its prefix
score and guard, the block-hash events and the router's index, prefix prompts from hash ids, and the
simulator driving the same policy."""

from __future__ import annotations

import random

from pdserve.bench.prefix_prompts import prefix_prompt
from pdserve.config.engine import SchedulerConfig
from pdserve.config.model import CATALOG
from pdserve.sched.block_manager import BlockManager, block_hashes
from pdserve.sched.colocated import ColocatedScheduler
from pdserve.sched.prefix_index import PrefixIndex
from pdserve.sched.request import Request
from pdserve.sched.routing import RoutingPolicy, WorkerLoad
from pdserve.sim.cluster import Simulator
from pdserve.sim.hardware import get_link
from pdserve.sim.instance import SimInstance
from pdserve.sim.network import Port
from pdserve.workload import RequestSpec
from tests.test_sim import FixedModel


def _serve(pol: RoutingPolicy, ws: list[WorkerLoad], prompt: int, hits: dict[str, int] | None = None) -> WorkerLoad:
    w = pol.pick_colocated(ws, prompt_tokens=prompt, hits=hits)
    assert w is not None
    w.pending_tokens += prompt - (hits or {}).get(w.name, 0)
    return w


def test_an_idle_pool_shares_sequential_requests_instead_of_loading_the_first_worker() -> None:
    """Poisson traffic below capacity often finds both workers idle: ties must not all go to the first."""
    pol = RoutingPolicy()
    ws = [WorkerLoad("a"), WorkerLoad("b")]
    picks = []
    for _ in range(10):  # each request finishes before the next arrives
        w = _serve(pol, ws, 100)
        picks.append(w.name)
        w.pending_tokens = 0
    assert picks.count("a") == picks.count("b") == 5


def test_placement_weighs_prompt_tokens_so_long_prompts_spread() -> None:
    pol = RoutingPolicy()
    ws = [WorkerLoad("a"), WorkerLoad("b")]
    first = _serve(pol, ws, 2000)  # one long prompt on one worker ...
    others = [_serve(pol, ws, 100).name for _ in range(5)]  # ... short ones all go to the other
    assert all(n != first.name for n in others)
    # counting requests instead (the old policy) would have alternated them
    assert sum(w.pending_tokens for w in ws) == 2500


def test_prefix_hits_win_against_a_little_queue_but_not_a_long_one() -> None:
    pol = RoutingPolicy(routing="prefix_aware")
    a, b = WorkerLoad("a", pending_tokens=300), WorkerLoad("b")
    hits = {"a": 900}
    assert pol.pick_colocated([a, b], prompt_tokens=1000, hits=hits) is a  # 300 + 100 < 0 + 1000
    a.pending_tokens = 1000  # the guard: a cached prefix buys at most its own length of queue
    assert pol.pick_colocated([a, b], prompt_tokens=1000, hits=hits) is b
    # least_loaded ignores the hits
    assert RoutingPolicy().pick_colocated([WorkerLoad("a", pending_tokens=300), WorkerLoad("b")],
                                          prompt_tokens=1000, hits=hits).name == "b"  # type: ignore[union-attr]


def test_one_hot_prefix_does_not_pile_onto_one_worker() -> None:
    """Every request shares one 900-token prefix cached on `a`: requests go to `a` until its queue
    exceeds b's by what the prefix saves, then to b (which then caches it too), never all to a."""
    pol = RoutingPolicy(routing="prefix_aware")
    ws = [WorkerLoad("a"), WorkerLoad("b")]
    cached = {"a": 900}
    names = []
    for _ in range(40):
        w = _serve(pol, ws, 1000, dict(cached))
        cached[w.name] = 900
        names.append(w.name)
    assert 15 <= names.count("b") <= 25
    assert abs(ws[0].pending_tokens - ws[1].pending_tokens) <= 1000


def test_prefill_for_scores_prefix_and_keeps_link_preference() -> None:
    pol = RoutingPolicy(routing="prefix_aware")
    pre = [WorkerLoad("p0", pending_tokens=200), WorkerLoad("p1")]
    assert pol.prefill_for("d0", pre, prompt_tokens=1000, hits={"p0": 800}) == "p0"
    assert pol.prefill_for("d0", pre, bad_links=frozenset({"p0"}), prompt_tokens=1000, hits={"p0": 800}) == "p1"


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, 4, 0.0)


def test_block_manager_events_net_stores_and_evictions_and_the_index_follows() -> None:
    bm = BlockManager(4, 4, salt=b"s")
    bm.record_events()
    r = _req("r", list(range(9)))  # two full blocks + 1
    bm.allocate(r, 9)
    r.num_computed_tokens = 9
    bm.cache_full_blocks(r)
    bm.free(r)
    stored, evicted, cleared = bm.take_events()
    keys = block_hashes(list(range(8)), 4, salt=b"s")
    assert stored == keys and evicted == [] and not cleared
    idx = PrefixIndex()
    idx.apply("w", stored, evicted, cleared)
    assert idx.matched_blocks("w", block_hashes(list(range(12)), 4, salt=b"s")) == 2
    assert idx.matched_blocks("w", block_hashes(list(range(12)), 4, salt=b"other")) == 0
    s = _req("s", [50 + i for i in range(16)])  # needs all 4 blocks: both cached ones are evicted
    bm.allocate(s, 16)
    stored, evicted, cleared = bm.take_events()
    assert stored == [] and set(evicted) == set(keys)
    idx.apply("w", stored, evicted, cleared)
    assert idx.matched_blocks("w", keys) == 0
    bm.reset_prefix_cache()
    assert bm.take_events() == ([], [], True)


def test_event_log_overflow_sends_a_snapshot() -> None:
    bm = BlockManager(8, 2)
    bm.record_events(limit=2)
    r = _req("r", list(range(7)))
    bm.allocate(r, 7)
    r.num_computed_tokens = 7
    bm.cache_full_blocks(r)  # 3 stores > limit 2
    stored, evicted, cleared = bm.take_events()
    assert cleared and set(stored) == set(bm.hash_to_block) and len(stored) == 3


def test_index_placements_and_prefix_chain_stop_at_first_gap() -> None:
    idx = PrefixIndex()
    idx.add("w", [b"1", b"2", b"4"])
    assert idx.matched_blocks("w", [b"1", b"2", b"3", b"4"]) == 2
    idx.forget("w")
    assert idx.matched_blocks("w", [b"1"]) == 0


def test_prefix_prompts_share_exactly_the_blocks_their_hash_ids_share() -> None:
    vocab = list(range(100, 1100))
    cache: dict[int, list[int]] = {}
    a = prefix_prompt([1, 2, 3], 1400, vocab, block_tokens=32, cache=cache)
    b = prefix_prompt([1, 2, 9], 1536, vocab, block_tokens=32, cache=cache)
    assert len(a) == round(1400 * 32 / 512) and len(b) == 96
    assert a[:64] == b[:64] and a[64:] != b[64:len(a)]
    assert prefix_prompt([1, 2, 3], 1400, vocab, block_tokens=32) == a  # no cache: the same tokens
    assert prefix_prompt([7], 10_000, vocab, block_tokens=32)[:5] != a[:5]


def _sim(routing: str, prompts: list[list[int]], specs: list[RequestSpec]) -> tuple[int, list[float]]:
    insts = [SimInstance(f"c{k}", "colocated", ColocatedScheduler(SchedulerConfig(), BlockManager(300, 16)),
                         FixedModel(), Port(f"c{k}", 1e9)) for k in range(2)]
    sim = Simulator(insts, CATALOG["demo"], get_link("cx7-400g"), routing=RoutingPolicy(routing=routing))
    r = sim.run(specs, prompts=prompts)
    hits = sum(i.policy.block_manager.hits for i in insts)
    return hits, [r.instances[i.name]["busy_frac"] for i in insts]


def test_simulator_prefix_aware_hits_more_and_stays_balanced() -> None:
    rng = random.Random(0)
    vocab = list(range(1000))
    groups = [rng.choices(vocab, k=320) for _ in range(24)]  # 24 shared documents: more than one cache holds
    prompts = [groups[rng.randrange(24)] + rng.choices(vocab, k=48) for _ in range(240)]
    specs = [RequestSpec(0.25 * k, len(p), 8) for k, p in enumerate(prompts)]
    hit_ll, busy_ll = _sim("least_loaded", prompts, specs)
    hit_pa, busy_pa = _sim("prefix_aware", prompts, specs)
    assert hit_pa > 1.3 * hit_ll
    assert min(busy_pa) > 0.5 * max(busy_pa)
    assert min(busy_ll) > 0.7 * max(busy_ll)  # the load-aware baseline splits evenly


def test_the_router_hashes_a_prompt_as_the_worker_caches_it() -> None:
    """The router's keys for a prompt (the worker's block size and salt, last token left out) are
    the keys the worker's events publish, so a report alone (no placement of the router's own)
    yields the hit the worker's own lookup will find."""
    from pdserve.config.model import CATALOG as shapes
    from pdserve.config.schema import RouterConfig
    from pdserve.serve.router import ClusterBackend

    salt = b'["m#seed=0", "float32"]'
    bm = BlockManager(32, 16, salt=salt)
    bm.record_events()
    prompt = [(7 * i) % 300 for i in range(70)]
    r = _req("r", prompt)
    bm.allocate(r, 70)
    r.num_computed_tokens = 70
    bm.cache_full_blocks(r)
    bm.free(r)
    be = ClusterBackend(shapes["demo"], [], [], ["127.0.0.1:1", "127.0.0.1:2"],
                        config=RouterConfig(routing="prefix_aware"))
    w0, w1 = be.workers
    for w in be.workers:
        w.block_size, w.cache_salt = 16, salt
    assert be.index is not None
    be.index.apply(w0.name, *bm.take_events())
    follower = prompt[:64] + [1, 2, 3]
    hits, _ = be._prefix(follower, "colocated")
    again = _req("again", follower)
    assert hits == {w0.name: bm.match_prefix(again), w1.name: 0} and hits[w0.name] == 64
    w1.cache_salt = b"another model"  # another salt: other keys, no hit even with the same tokens
    be.index.apply(w1.name, list(bm.hash_to_block), [])
    assert be._prefix(follower, "colocated")[0][w1.name] == 0


def test_idle_prefill_and_decode_pools_both_take_turns_in_disaggregated_routing() -> None:
    """One request steps the decode ranking and the prefill pick: each pool rotates on its own."""
    pol = RoutingPolicy()
    pre = [WorkerLoad("p0"), WorkerLoad("p1")]
    dec = [WorkerLoad("d0", free_blocks=50, total_blocks=50), WorkerLoad("d1", free_blocks=50, total_blocks=50)]
    firsts, prefills = [], []
    for _ in range(6):
        r = pol.route(100, pre, dec, [])
        firsts.append(r.decode[0])
        prefills.append(pol.prefill_for(r.decode[0], pre, prompt_tokens=100))
    assert firsts.count("d0") == firsts.count("d1") == 3
    assert prefills.count("p0") == prefills.count("p1") == 3
