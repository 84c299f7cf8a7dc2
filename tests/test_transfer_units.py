"""Pieces of the transfer plane on their own: the shm ring, chunk validation, bf16, retries."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.transfer import KVPoll, make_transfer_pair
from pdserve.transfer.protocol import KVChunk, chunk_error, decode_to_receiver, encode
from pdserve.transfer.shm import ShmRing


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.one_of(st.integers(1, 40), st.just(0)), max_size=60))
def test_ring_regions_never_overlap(ops: list[int]) -> None:
    """Random alloc (n > 0) / free-oldest (0) sequences: live regions stay inside and disjoint."""
    ring = ShmRing(100)
    live: list[tuple[int, int]] = []
    try:
        for n in ops:
            if n == 0:
                if live:
                    ring.free_oldest()
                    live.pop(0)
                continue
            off = ring.alloc(n)
            if off is None:
                assert live, "an empty ring must take anything up to its capacity"
                continue
            assert 0 <= off and off + n <= 100
            for o, m in live:
                assert off + n <= o or o + m <= off, f"{(off, n)} overlaps {(o, m)}"
            live.append((off, n))
    finally:
        ring.destroy()


def test_ring_put_and_wrap() -> None:
    ring = ShmRing(64)
    try:
        a = ring.alloc(40)
        assert a == 0 and ring.alloc(30) is None  # neither the end (24) nor the start has room
        assert ring.alloc(24) == 40
        ring.free_oldest()
        assert ring.alloc(30) == 0  # wrapped to the start
        ring.put(0, np.arange(30, dtype=np.uint8))
        assert bytes(ring.shm.buf[:30]) == bytes(range(30))
        assert ring.alloc(11) is None and ring.alloc(10) == 30
    finally:
        ring.destroy()


def test_chunk_validation() -> None:
    good = KVChunk("r", 0, 2, [1, 2], "float16", [2, 2, 4], 32, 0)
    assert chunk_error(good, 32) == ""
    assert "bytes arrived" in chunk_error(good, 31)
    assert "shape" in chunk_error(KVChunk("r", 0, 2, [1], "float16", [2, 2, 4], 32, 0), 32)
    assert "layer" in chunk_error(KVChunk("r", 2, 2, [1, 2], "float16", [2, 2, 4], 32, 0), 32)
    assert "dtype" in chunk_error(KVChunk("r", 0, 2, [1, 2], "object", [2, 2, 4], 32, 0), 32)
    assert decode_to_receiver(encode(good)) == good
    with pytest.raises(ValueError):
        decode_to_receiver(b"\x93\x01\x02\x03")


def _settle(poll, timeout: float = 30.0) -> KVPoll:
    deadline = time.monotonic() + timeout
    while poll() not in (KVPoll.SUCCESS, KVPoll.FAILED) and time.monotonic() < deadline:
        time.sleep(0.005)
    return poll()


class RawSink:
    def __init__(self) -> None:
        self.got: dict[int, tuple[str, tuple[int, ...], bytes]] = {}

    def write(self, layer: int, block_ids: list[int], dtype: str, shape: tuple[int, ...],
              data: memoryview) -> None:
        self.got[layer] = (dtype, shape, bytes(data))


@pytest.mark.parametrize("kind", ["tcp", "shm"])
def test_bf16_as_raw_words(kind: str) -> None:
    sink = RawSink()
    sender, receiver = make_transfer_pair(kind, sink, timeout_s=3.0)
    words = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)  # what tensor.view(uint16).numpy() gives
    receiver.expect("r", 1, [4, 5, 6])
    sender.send_layer("r", receiver.address(), 0, 1, [4, 5, 6], words, dtype="bfloat16")
    assert _settle(lambda: receiver.poll("r")) is KVPoll.SUCCESS
    assert sink.got[0] == ("bfloat16", (2, 3, 4), words.tobytes())
    sender.close()
    receiver.close()


def test_send_layer_rejects_bad_data_and_allows_a_retry_elsewhere() -> None:
    sink = RawSink()
    sender, r1 = make_transfer_pair("fake", sink, timeout_s=3.0)
    _, r2 = make_transfer_pair("fake", sink, timeout_s=3.0)
    with pytest.raises(ValueError, match="not"):
        sender.send_layer("r", r1.address(), 0, 1, [0, 1], np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        sender.send_layer("r", r1.address(), 0, 1, [0], np.zeros((2, 1, 4, 2), np.float32)[..., 0])
    sender.send_layer("r", r1.address(), 0, 1, [0], np.zeros((2, 1, 4), np.float32))  # r1 did not expect it
    assert _settle(lambda: sender.poll("r")) is KVPoll.FAILED
    r2.expect("r", 1, [0])
    sender.send_layer("r", r2.address(), 0, 1, [0], np.ones((2, 1, 4), np.float32))
    assert _settle(lambda: sender.poll("r")) is KVPoll.SUCCESS and r2.poll("r") is KVPoll.SUCCESS
    sender.close()
    r1.close()
    r2.close()
