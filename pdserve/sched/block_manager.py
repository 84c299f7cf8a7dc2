"""KV block accounting: a reference-counted allocator with a prefix cache and eviction.

A block is in one of three places:
  * in use      — ref_count > 0, listed in some request's `block_ids`;
  * cached      — ref_count == 0 but holding a full block whose content hash is known, so a later
                  request with the same prefix can take it back; evictable;
  * free        — ref_count == 0 and no hash.
`num_free_blocks` counts free and cached blocks: both can be handed out.

Prefix-cache keys form a SHA-256 chain: key_i = sha256(key_{i-1} + token ids of block i), so a
block is only reused when the whole prefix before it matches too. A collision would silently serve
another prompt's KV, so the key is a cryptographic digest (not Python's 64-bit `hash()`), and the
chain's root is derived from a salt naming everything besides the tokens that makes KV differ
(model, dtype, an adapter id): blocks of the same tokens under different salts never match.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import sys
from array import array
from collections import OrderedDict, deque

from pdserve.sched.request import Request

EVICTION_POLICIES = ("lru", "fifo")
_ROOT_TAG = b"pdserve-prefix-cache-v1\0"


def cache_salt(model: str = "", dtype: str = "", adapter: str = "") -> bytes:
    """The salt for a cache whose KV comes from this model, dtype and adapter (LoRA id; "" = none)."""
    return json.dumps([model, dtype, adapter]).encode()  # unambiguous, whatever the strings hold


def chain_root(salt: bytes = b"") -> bytes:
    """The parent key of a prompt's first block."""
    return hashlib.sha256(_ROOT_TAG + salt).digest()


def block_hashes(token_ids: list[int], block_size: int, parent: bytes | None = None,
                 salt: bytes = b"") -> list[bytes]:
    """Chain keys of every full block of `token_ids`, continuing from `parent` (else the salt's root)."""
    packed = array("q", token_ids)  # 8 bytes a token: any int id, one C loop
    if sys.byteorder != "little":
        packed.byteswap()  # the same key on every host
    raw = packed.tobytes()
    step = 8 * block_size
    sha = hashlib.sha256
    h = parent if parent is not None else chain_root(salt)
    out: list[bytes] = []
    for i in range(0, len(raw) - step + 1, step):
        h = sha(h + raw[i : i + step]).digest()
        out.append(h)
    return out


def _token_slice(req: Request, start: int, end: int) -> list[int]:
    """`req.all_token_ids[start:end]` without concatenating the whole prompt and output."""
    prompt = req.prompt_token_ids
    p = len(prompt)
    if end <= p:
        return prompt[start:end]
    if start >= p:
        return req.output_token_ids[start - p : end - p]
    return prompt[start:] + req.output_token_ids[: end - p]


class BlockManager:
    """Hands out KV blocks to requests; the engine and the simulator use the same one."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        eviction: str = "lru",
        salt: bytes = b"",
    ) -> None:
        """`salt` (see `cache_salt`) keeps caches of different models, dtypes or adapters apart."""
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {EVICTION_POLICIES}, got {eviction!r}")
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.eviction = eviction
        self.salt = salt
        self._root = chain_root(salt)
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_blocks))
        # Cached, unreferenced blocks. lru: ordered by when they were last released;
        # fifo: a heap ordered by when their content was first cached.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._fifo: list[tuple[int, int]] = []
        self._cached_seq = [0] * num_blocks
        self._seq = 0
        self._evictable = 0
        # Per request: chain hashes of its full blocks registered so far.
        self._req_hashes: dict[str, list[bytes]] = {}
        self.hits = 0
        self.queries = 0
        # Block-hash events for the router's prefix index (None: not recorded): (stored?, key).
        self._events: deque[tuple[bool, bytes]] | None = None
        self._events_limit = 0
        self._events_lost = False  # reset or overflowed since the last take: send a snapshot

    # ---- block-hash events ------------------------------------------------------------------
    def record_events(self, limit: int = 65536) -> None:
        """Start recording which keys enter and leave the prefix cache (a worker publishing them
        to the router); beyond `limit` unread events the log is dropped for a snapshot."""
        self._events = deque()
        self._events_limit = limit

    def _event(self, stored: bool, key: bytes) -> None:
        ev = self._events
        if ev is None:
            return
        if len(ev) >= self._events_limit:
            ev.clear()
            self._events_lost = True
        ev.append((stored, key))

    def take_events(self) -> tuple[list[bytes], list[bytes], bool]:
        """(keys now cached, keys no longer cached, cleared) since the last take, netted per key.
        cleared: forget earlier events; the stored keys are then the whole cache. Safe to call
        from another thread than the one allocating (deque appends and pops are atomic)."""
        ev = self._events
        if ev is None:
            return [], [], False
        last: dict[bytes, bool] = {}
        while ev:
            stored, key = ev.popleft()
            last[key] = stored
        if self._events_lost:
            self._events_lost = False
            return list(self.hash_to_block), [], True
        return [k for k, s in last.items() if s], [k for k, s in last.items() if not s], False

    # ---- capacity ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + self._evictable

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    # ---- allocation -------------------------------------------------------------------------
    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        block = self._pop_evictable()
        key = self.block_hash[block]
        if key is not None and self.hash_to_block.get(key) == block:
            del self.hash_to_block[key]
            self._event(False, key)
        self.block_hash[block] = None
        return block

    def _pop_evictable(self) -> int:
        if self.eviction == "lru":
            block, _ = self._lru.popitem(last=False)
        else:
            while True:
                seq, block = heapq.heappop(self._fifo)
                if self.ref_count[block] == 0 and self._cached_seq[block] == seq and self.block_hash[block] is not None:
                    break
        self._evictable -= 1
        return block

    def _unevict(self, block: int) -> None:
        """A cached block is referenced again: take it off the eviction list."""
        if self.eviction == "lru":
            del self._lru[block]
        # fifo: the heap entry is skipped lazily because ref_count > 0 when it surfaces.
        self._evictable -= 1

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] > 0:
            return
        if self.block_hash[block] is None:
            self._free.append(block)
            return
        self._evictable += 1
        if self.eviction == "lru":
            self._lru[block] = None
        else:
            heapq.heappush(self._fifo, (self._cached_seq[block], block))

    def match_prefix(self, req: Request) -> int:
        """On first scheduling, take cached blocks for the request's prefix; returns tokens reused.

        At least one token is always left to compute, since the engine needs its logits.
        """
        if not self.enable_prefix_caching or req.block_ids or not req.use_prefix_cache:  # openai: prompt logprobs
            return 0  # before any token list is built
        hashes = block_hashes(_token_slice(req, 0, req.num_tokens - 1), self.block_size, self._root)
        self.queries += len(hashes)
        reused: list[int] = []
        for h in hashes:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            if self.ref_count[block] == 0:
                self._unevict(block)
            self.ref_count[block] += 1
            reused.append(block)
        self.hits += len(reused)
        req.block_ids = reused
        self._req_hashes[req.request_id] = hashes[: len(reused)]
        n = len(reused) * self.block_size
        req.num_computed_tokens = n
        req.num_cached_tokens = n
        return n

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_ids)
        return need <= self.num_free_blocks

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Grow the request's blocks to hold `num_new_tokens` more; False (and no change) if full."""
        return self.allocate_tokens(req, req.num_computed_tokens + num_new_tokens)

    def allocate_tokens(self, req: Request, num_tokens: int) -> bool:
        """Reserve blocks for `num_tokens` tokens in total (decode role: before KV arrives)."""
        blocks = req.block_ids
        need = -(-num_tokens // self.block_size) - len(blocks)
        if need <= 0:
            return True  # the last block still has room: the common decode step
        free = self._free
        if need > len(free) + self._evictable:
            return False
        if need <= len(free):  # the common case: no eviction
            take = free.popleft
            new = [take() for _ in range(need)]
        else:
            new = [free.popleft() if free else self._take() for _ in range(need)]
        rc = self.ref_count
        for block in new:
            rc[block] = 1
        blocks.extend(new)
        return True

    def append_block_each(self, reqs: list[Request]) -> bool:
        """One more block for each listed request, in list order (a run of decode steps)."""
        if len(reqs) > len(self._free) + self._evictable:
            return False
        free, rc = self._free, self.ref_count
        for req in reqs:
            block = free.popleft() if free else self._take()
            rc[block] = 1
            req.block_ids.append(block)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """After KV is written, publish newly full blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        done = self._req_hashes.setdefault(req.request_id, [])
        num_full = min(req.num_computed_tokens // self.block_size, len(req.block_ids))
        if num_full <= len(done):
            return
        parent = done[-1] if done else self._root
        start = len(done)
        tokens = _token_slice(req, start * self.block_size, num_full * self.block_size)
        new = block_hashes(tokens, self.block_size, parent)
        for i, h in enumerate(new, start):
            block = req.block_ids[i]
            done.append(h)
            if self.block_hash[block] is None and h not in self.hash_to_block:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
                self._event(True, h)
                self._seq += 1
                self._cached_seq[block] = self._seq

    def free(self, req: Request) -> None:
        """Drop the request's references. Blocks released last are evicted last under lru."""
        rc, hashes, free = self.ref_count, self.block_hash, self._free
        if not self.enable_prefix_caching:  # no hashes, no sharing: every count is 1
            ids = req.block_ids[::-1]
            for block in ids:
                rc[block] = 0
            free.extend(ids)
            req.block_ids = []
            req.num_computed_tokens = 0
            self._req_hashes.pop(req.request_id, None)
            return
        for block in reversed(req.block_ids):
            if rc[block] == 1 and hashes[block] is None:  # _release's common case, inlined
                rc[block] = 0
                free.append(block)
            else:
                self._release(block)
        req.block_ids = []
        req.num_computed_tokens = 0
        self._req_hashes.pop(req.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after the KV contents became untrustworthy)."""
        for block in list(self.hash_to_block.values()):
            if self.ref_count[block] == 0:
                self._free.append(block)
            self.block_hash[block] = None
        self.hash_to_block.clear()
        if self._events is not None:
            self._events.clear()
            self._events_lost = True
        self._lru.clear()
        self._fifo.clear()
        self._evictable = 0
