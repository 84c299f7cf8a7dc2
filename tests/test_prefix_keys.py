"""Prefix-cache keys: a SHA-256 chain over blocks, rooted in a salt naming model, dtype and adapter."""

from __future__ import annotations

import hashlib
import struct

from pdserve.sched.block_manager import BlockManager, block_hashes, cache_salt, chain_root
from pdserve.sched.request import Request

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), max_tokens=4, arrival_time=0.0)


def cached(bm: BlockManager, tokens: list[int]) -> None:
    """Run a request over `tokens` to completion of its prompt and publish its full blocks."""
    r = req(f"w{len(bm.hash_to_block)}", tokens)
    bm.match_prefix(r)
    assert bm.allocate(r, r.num_uncomputed_tokens)
    r.num_computed_tokens = r.num_tokens
    bm.cache_full_blocks(r)
    bm.free(r)


def test_keys_are_a_sha256_chain_over_little_endian_token_ids() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # two full blocks; the ninth token makes no key
    salt = cache_salt("m", "float32")
    h = hashlib.sha256(b"pdserve-prefix-cache-v1\0" + salt).digest()
    want = []
    for i in (0, 4):
        h = hashlib.sha256(h + struct.pack("<4q", *tokens[i:i + 4])).digest()
        want.append(h)
    assert block_hashes(tokens, BS, salt=salt) == want
    assert chain_root(salt) == hashlib.sha256(b"pdserve-prefix-cache-v1\0" + salt).digest()


def test_a_block_key_depends_on_every_block_before_it() -> None:
    a = block_hashes([1, 2, 3, 4, 9, 9, 9, 9], BS)
    b = block_hashes([1, 2, 3, 5, 9, 9, 9, 9], BS)
    assert a[1] != b[1]  # same second block, different first block
    # Continuing a chain from its last key gives what hashing the whole prefix gives.
    whole = block_hashes(list(range(12)), BS)
    assert block_hashes(list(range(8, 12)), BS, parent=block_hashes(list(range(8)), BS)[-1]) == whole[2:]


def test_same_tokens_under_another_salt_share_nothing() -> None:
    tokens = list(range(16))
    salts = [cache_salt("llama", "bfloat16"), cache_salt("llama", "float32"), cache_salt("qwen", "bfloat16"),
             cache_salt("llama", "bfloat16", adapter="lora-1"), b""]
    keys = [set(block_hashes(tokens, BS, salt=s)) for s in salts]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not keys[i] & keys[j], (salts[i], salts[j])
    # The salt fields cannot bleed into each other.
    assert cache_salt("a,b", "") != cache_salt("a", "b")
    # A cache under one salt never matches keys made under another.
    bm = BlockManager(8, BS, salt=salts[0])
    cached(bm, tokens + [99])
    assert set(bm.hash_to_block) == keys[0]
    other = BlockManager(8, BS, salt=salts[1])
    cached(other, tokens + [99])
    assert not set(bm.hash_to_block) & set(other.hash_to_block)


def test_distinct_prompts_whose_python_hashes_collide_do_not_share_kv() -> None:
    # Python's hash() reduces ints modulo 2**61 - 1, so the old tuple-hash keys of these two
    # blocks were equal and the second prompt was served the first prompt's KV.
    assert hash((0, (0, 0, 0, 0))) == hash((0, (2**61 - 1,) * 4))
    bm = BlockManager(8, BS)
    cached(bm, [0, 0, 0, 0, 7])
    victim = req("victim", [2**61 - 1] * 4 + [7])
    assert bm.match_prefix(victim) == 0 and victim.block_ids == []
    again = req("again", [0, 0, 0, 0, 7])
    assert bm.match_prefix(again) == BS  # the real prefix still hits
