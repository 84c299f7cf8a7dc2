"""BlockManager stepped by hand: reference counts, allocation, prefix cache, eviction order."""

import pytest

from pdserve.sched.block_manager import BlockManager, block_hashes
from pdserve.sched.request import Request

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), max_tokens=16, arrival_time=0.0)


def check_invariants(bm: BlockManager) -> None:
    in_use = sum(1 for c in bm.ref_count if c > 0)
    assert all(c >= 0 for c in bm.ref_count)
    assert in_use + bm.num_free_blocks == bm.num_blocks
    # The prefix-cache map and the per-block hashes agree both ways.
    for h, b in bm.hash_to_block.items():
        assert bm.block_hash[b] == h
    assert sum(1 for h in bm.block_hash if h is not None) == len(bm.hash_to_block)


def compute(bm: BlockManager, r: Request) -> None:
    """Allocate and 'compute' every uncomputed token of `r`, then publish its full blocks."""
    n = r.num_uncomputed_tokens
    assert bm.allocate(r, n)
    r.num_computed_tokens += n
    bm.cache_full_blocks(r)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="eviction"):
        BlockManager(4, BS, eviction="random")
    with pytest.raises(ValueError):
        BlockManager(0, BS)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_allocate_grows_only_when_a_block_fills_and_free_returns_all() -> None:
    bm = BlockManager(8, BS)
    r = req("a", range(10))
    assert bm.blocks_needed(10) == 3
    assert bm.can_allocate(r, 10)
    assert bm.allocate(r, 10)
    assert len(r.block_ids) == 3 and len(set(r.block_ids)) == 3
    assert all(bm.ref_count[b] == 1 for b in r.block_ids)
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 3
    assert bm.usage == pytest.approx(3 / 8)
    r.num_computed_tokens = 10
    assert bm.allocate(r, 2)  # 12 tokens still fit in 3 blocks
    assert len(r.block_ids) == 3
    assert bm.allocate(r, 3)  # 13 tokens need a 4th
    assert len(r.block_ids) == 4 and bm.num_free_blocks == 4
    check_invariants(bm)
    bm.free(r)
    assert r.block_ids == [] and r.num_computed_tokens == 0
    assert bm.num_free_blocks == 8 and all(c == 0 for c in bm.ref_count)
    check_invariants(bm)


def test_allocate_tokens_reserves_a_total() -> None:
    bm = BlockManager(8, BS)
    r = req("a", range(9))
    assert bm.allocate_tokens(r, 10)
    assert len(r.block_ids) == 3
    assert bm.allocate_tokens(r, 12)  # already enough
    assert len(r.block_ids) == 3
    assert not bm.allocate_tokens(r, 100)
    assert len(r.block_ids) == 3 and bm.num_free_blocks == 5


def test_allocation_failure_changes_nothing() -> None:
    bm = BlockManager(4, BS)
    holder = req("h", range(100, 108))
    compute(bm, holder)  # 2 blocks in use
    cached = req("c", range(200, 204 + 1))  # 1 full block cached after free
    compute(bm, cached)
    bm.free(cached)
    hashes_before = dict(bm.hash_to_block)
    refs_before = list(bm.ref_count)
    free_before = bm.num_free_blocks
    assert free_before == 2  # one plain free block + one cached block
    r = req("r", range(9))
    assert not bm.can_allocate(r, 9)
    assert not bm.allocate(r, 9)  # needs 3
    assert r.block_ids == []
    assert bm.ref_count == refs_before
    assert bm.hash_to_block == hashes_before  # nothing evicted on the failed attempt
    assert bm.num_free_blocks == free_before
    check_invariants(bm)


def test_reference_counts_on_shared_prefix() -> None:
    bm = BlockManager(8, BS)
    prompt = list(range(1, 13))  # 3 full blocks
    a = req("a", prompt)
    compute(bm, a)
    b = req("b", prompt)
    assert bm.match_prefix(b) == 8  # 2 blocks: the last token must be computed
    assert b.block_ids == a.block_ids[:2]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert [bm.ref_count[x] for x in a.block_ids] == [2, 2, 1]
    assert bm.allocate(b, b.num_uncomputed_tokens)
    assert len(b.block_ids) == 3 and b.block_ids[2] != a.block_ids[2]
    assert bm.num_free_blocks == 4
    check_invariants(bm)
    a_tail = a.block_ids[2]
    bm.free(a)
    assert [bm.ref_count[x] for x in b.block_ids[:2]] == [1, 1]
    assert bm.ref_count[a_tail] == 0 and bm.block_hash[a_tail] is not None  # cached, evictable
    assert bm.num_free_blocks == 5
    check_invariants(bm)
    bm.free(b)
    assert all(c == 0 for c in bm.ref_count)
    assert bm.num_free_blocks == bm.num_blocks
    check_invariants(bm)


def test_num_free_blocks_counts_cached_unreferenced_blocks_and_they_can_be_evicted() -> None:
    bm = BlockManager(4, BS)
    a = req("a", range(16))
    compute(bm, a)
    assert len(bm.hash_to_block) == 4
    bm.free(a)
    assert bm.num_free_blocks == 4  # all cached, all available
    assert len(bm.hash_to_block) == 4
    big = req("big", range(500, 516))
    assert bm.allocate(big, 16)  # takes every block by evicting the cache
    assert len(set(big.block_ids)) == 4
    assert bm.hash_to_block == {}
    assert bm.num_free_blocks == 0
    check_invariants(bm)
    bm.free(big)
    assert bm.num_free_blocks == 4


def test_match_prefix_hit_and_misses() -> None:
    bm = BlockManager(16, BS)
    base = list(range(1, 13))
    compute(bm, req("a", base))
    # Same prompt plus one token: every full block of the prefix hits.
    r = req("longer", base + [99])
    assert bm.match_prefix(r) == 12
    bm.free(r)
    # First block differs: the chain breaks at once, though blocks 2 and 3 are identical.
    r = req("first-differs", [0] + base[1:] + [99])
    assert bm.match_prefix(r) == 0 and r.block_ids == []
    # Second block differs: only the first block is reused.
    changed = base[:5] + [77] + base[6:] + [99]
    r = req("second-differs", changed)
    assert bm.match_prefix(r) == 4 and len(r.block_ids) == 1
    bm.free(r)
    # A prompt shorter than a block cannot hit.
    r = req("short", base[:3])
    assert bm.match_prefix(r) == 0
    check_invariants(bm)


def test_match_prefix_always_leaves_one_token_to_compute() -> None:
    bm = BlockManager(8, BS)
    prompt = list(range(8))  # exactly 2 full blocks
    compute(bm, req("a", prompt))
    r = req("b", prompt)
    assert bm.match_prefix(r) == 4
    assert r.num_uncomputed_tokens == 4
    one = req("c", prompt[:4])
    assert bm.match_prefix(one) == 0
    assert one.num_uncomputed_tokens == 4


def test_match_prefix_counts_hits_and_queries_and_runs_once() -> None:
    bm = BlockManager(8, BS)
    compute(bm, req("a", range(8)))
    r = req("b", list(range(8)) + [1, 2, 3, 4, 5])  # 3 full blocks queried, 2 hit
    assert bm.match_prefix(r) == 8
    assert (bm.hits, bm.queries) == (2, 3)
    assert bm.match_prefix(r) == 0  # already holds blocks: no second match
    assert (bm.hits, bm.queries) == (2, 3)


def test_match_prefix_disabled() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    compute(bm, req("a", range(8)))
    assert bm.hash_to_block == {}
    r = req("b", list(range(8)) + [1])
    assert bm.match_prefix(r) == 0 and r.block_ids == []


def test_duplicate_content_is_cached_once() -> None:
    bm = BlockManager(8, BS)
    a, b = req("a", range(8)), req("b", range(8))
    for r in (a, b):  # both computed before either could hit
        compute(bm, r)
    assert len(bm.hash_to_block) == 2
    assert set(bm.hash_to_block.values()) == set(a.block_ids)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    check_invariants(bm)


def test_cache_full_blocks_incrementally_matches_whole_chain() -> None:
    bm = BlockManager(8, BS)
    tokens = list(range(30, 43))
    r = req("a", tokens)
    assert bm.allocate(r, 6)
    r.num_computed_tokens = 6
    bm.cache_full_blocks(r)
    assert len(bm.hash_to_block) == 1
    assert bm.allocate(r, 7)
    r.num_computed_tokens = 13
    bm.cache_full_blocks(r)
    assert set(bm.hash_to_block) == set(block_hashes(tokens, BS))
    assert [bm.hash_to_block[h] for h in block_hashes(tokens, BS)] == r.block_ids[:3]


def _three_cached_single_blocks(bm: BlockManager) -> dict[str, list[int]]:
    prompts = {"A": [1, 1, 1, 1], "B": [2, 2, 2, 2], "C": [3, 3, 3, 3]}
    for name, p in prompts.items():  # cached and released in order A, B, C
        r = req(name, p)
        compute(bm, r)
        bm.free(r)
    assert bm.num_free_blocks == bm.num_blocks == 3
    return prompts


def _rehit(bm: BlockManager, prompt: list[int]) -> None:
    r = req("rehit", prompt + [0])
    assert bm.match_prefix(r) == BS
    assert bm.num_free_blocks == bm.num_blocks - 1
    bm.free(r)


def _evict_one(bm: BlockManager) -> set[int]:
    """Allocate one block (from the cache) and return which prompt hashes are still cached."""
    r = req(f"new{bm.num_free_blocks}", [9, 9, 9])
    assert bm.allocate(r, 3)
    return set(bm.hash_to_block)


def _cached_names(bm: BlockManager, prompts: dict[str, list[int]]) -> set[str]:
    keys = set(bm.hash_to_block)
    return {n for n, p in prompts.items() if block_hashes(p, BS)[0] in keys}


def test_lru_evicts_least_recently_released_and_rehit_moves_to_back() -> None:
    bm = BlockManager(3, BS, eviction="lru")
    prompts = _three_cached_single_blocks(bm)
    _rehit(bm, prompts["A"])  # A released again: now most recent
    _evict_one(bm)
    assert _cached_names(bm, prompts) == {"A", "C"}  # B went first
    _evict_one(bm)
    assert _cached_names(bm, prompts) == {"A"}
    _evict_one(bm)
    assert _cached_names(bm, prompts) == set()
    check_invariants(bm)


def test_fifo_evicts_first_cached_even_if_rehit() -> None:
    bm = BlockManager(3, BS, eviction="fifo")
    prompts = _three_cached_single_blocks(bm)
    _rehit(bm, prompts["A"])
    _rehit(bm, prompts["A"])
    _evict_one(bm)
    assert _cached_names(bm, prompts) == {"B", "C"}
    _evict_one(bm)
    assert _cached_names(bm, prompts) == {"C"}
    _evict_one(bm)
    assert _cached_names(bm, prompts) == set()
    check_invariants(bm)


@pytest.mark.parametrize("eviction", ["lru", "fifo"])
def test_no_block_handed_out_twice_after_rehits(eviction: str) -> None:
    bm = BlockManager(3, BS, eviction=eviction)
    prompts = _three_cached_single_blocks(bm)
    for name in ("A", "B", "A", "C", "A"):
        _rehit(bm, prompts[name])
    r = req("all", range(12))
    assert bm.allocate(r, 12)
    assert sorted(r.block_ids) == [0, 1, 2]
    assert bm.num_free_blocks == 0
    assert not bm.allocate(req("more", [1]), 1)
    bm.free(r)
    check_invariants(bm)


def test_lru_within_one_request_evicts_the_tail_first() -> None:
    bm = BlockManager(2, BS, eviction="lru")
    prompt = list(range(8))
    r = req("a", prompt)
    compute(bm, r)
    bm.free(r)
    _evict_one(bm)
    # The head of the prefix (useful to more requests) survives.
    assert set(bm.hash_to_block) == {block_hashes(prompt, BS)[0]}


def test_reset_prefix_cache() -> None:
    bm = BlockManager(6, BS)
    cached = req("a", range(8))
    compute(bm, cached)
    bm.free(cached)
    held = req("b", range(100, 108))
    compute(bm, held)  # hashed blocks still in use
    assert len(bm.hash_to_block) == 4
    bm.reset_prefix_cache()
    assert bm.hash_to_block == {}
    assert all(h is None for h in bm.block_hash)
    assert bm.num_free_blocks == 4
    assert bm.match_prefix(req("c", list(range(8)) + [1])) == 0
    bm.free(held)
    assert bm.num_free_blocks == 6
    check_invariants(bm)
    everything = req("d", range(24))
    assert bm.allocate(everything, 24)
    assert sorted(everything.block_ids) == list(range(6))
