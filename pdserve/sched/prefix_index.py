"""The router's index of which worker's prefix cache holds which KV blocks, pure.

Workers publish block-hash events with their load reports (a block's chain key stored in the
prefix cache, or evicted from it; see `BlockManager.take_events`). The keys are the prefix-cache
chain keys themselves (`block_manager.block_hashes`, with the worker's salt and block size), so
the router hashes a prompt exactly as the worker will and counts, per worker, how many of the
prompt's leading blocks it holds. A key means "this block and the whole prefix before it", so
the count stops at the first block a worker lacks.

The router also records its own placements at once (`add`): a worker that was just sent a
prompt will hold its blocks a moment later, and without that a burst of requests sharing a new
prefix would scatter before the first report. A placement that never gets computed (an abort)
stays until the worker's events say otherwise or the worker is forgotten; an index entry is a
hint for placement only, never trusted for KV contents.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pdserve.sched.block_manager import block_hashes


class PrefixIndex:
    """Worker name -> the chain keys its prefix cache holds (as last reported, plus placements)."""

    def __init__(self) -> None:
        self._held: dict[str, set[bytes]] = {}

    def apply(self, worker: str, stored: Iterable[bytes], evicted: Iterable[bytes], cleared: bool = False) -> None:
        """One report's events, in order: `cleared` (the worker's cache was reset or its event log
        overflowed: forget what it held) first, then evictions, then stores (a report's stores are
        the state after its evictions, see `BlockManager.take_events`)."""
        held = self._held.setdefault(worker, set())
        if cleared:
            held.clear()
        held.difference_update(evicted)
        held.update(stored)

    def add(self, worker: str, keys: Iterable[bytes]) -> None:
        """The router placed a prompt with these block keys on `worker`."""
        self._held.setdefault(worker, set()).update(keys)

    def forget(self, worker: str) -> None:
        """The worker left (its cache may be gone with it)."""
        self._held.pop(worker, None)

    def matched_blocks(self, worker: str, keys: Sequence[bytes]) -> int:
        """How many of the leading `keys` `worker` holds."""
        held = self._held.get(worker)
        if not held:
            return 0
        n = 0
        for k in keys:
            if k not in held:
                break
            n += 1
        return n

    def lookup(self, prompt: Sequence[int], chains: Iterable[tuple[str, int, bytes]]
               ) -> tuple[dict[str, int], dict[str, list[bytes]]]:
        """Per (worker, block size, salt): prompt tokens its prefix cache holds, and the prompt's
        block keys as that worker computes them (hashed once per distinct chain). The last token
        is left out, as the worker's own lookup does (it always computes one)."""
        hits: dict[str, int] = {}
        keys: dict[str, list[bytes]] = {}
        by_chain: dict[tuple[int, bytes], list[bytes]] = {}
        for name, block_size, salt in chains:
            if (block_size, salt) not in by_chain:
                by_chain[block_size, salt] = block_hashes(list(prompt[: len(prompt) - 1]), block_size, salt=salt)
            keys[name] = by_chain[block_size, salt]
            hits[name] = self.matched_blocks(name, keys[name]) * block_size
        return hits, keys

    def size(self, worker: str) -> int:
        return len(self._held.get(worker, ()))
