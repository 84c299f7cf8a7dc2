"""The in-process "fake" transport: a sender hands chunks straight to a receiver in the same process.

Receivers register here when they start with `transport="fake"` and senders look them up by the
id in a "fake://id" address; both sides import this module, neither imports the other. The
registry holds receivers weakly, so a receiver nobody else references disappears from it.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Protocol

from pdserve.transfer.protocol import KVAck, KVChunk


class FakePeer(Protocol):
    """What a sender needs of a receiver it calls directly."""

    def handle_chunk(self, chunk: KVChunk, data: memoryview, seen: set[str] | None = None) -> KVAck: ...

    def fail(self, request_id: str, reason: str) -> None: ...


_ids = itertools.count()
_receivers: weakref.WeakValueDictionary[str, FakePeer] = weakref.WeakValueDictionary()


def register(receiver: FakePeer) -> str:
    """Make `receiver` reachable at "fake://<the returned id>" from this process."""
    fake_id = str(next(_ids))
    _receivers[fake_id] = receiver
    return fake_id


def lookup(fake_id: str) -> FakePeer | None:
    return _receivers.get(fake_id)
