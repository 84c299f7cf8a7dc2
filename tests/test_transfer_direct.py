"""Chunks received straight into the decode cache's blocks (the sink offers views of them): real
loopback sockets and shared memory; bytes exact, corruption and wrong keys refused, nothing
written through the buffered path."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pdserve.config import TransferConfig
from pdserve.transfer import KVPoll, faults, make_transfer_pair
from pdserve.transfer.blocks import MAX_VIEWS, Blocks, Check, block_views, copy_into_views, runs
from pdserve.transfer.protocol import payload_digest, payload_key
from pdserve.transfer.shm import ShmRing
from tests.test_transfer import SHAPE, CacheSink, make_kv, settle, wait_for

SECRET = b"cluster-secret"


class ViewSink(CacheSink):
    """The test cache, also offering views of its blocks (as the decode worker's CPU sink does)."""

    def __init__(self, num_layers: int, dtype: str = "float32") -> None:
        super().__init__(num_layers, dtype)
        self.viewed = 0

    def views(self, layer: int, block_ids: list[int], dtype: str, shape: tuple[int, ...]) -> list[memoryview] | None:
        self.viewed += 1
        return block_views(self.kv[layer], block_ids)


def test_block_views_follow_the_payload_layout() -> None:
    cache = np.zeros((2, 10, *SHAPE), np.float32)
    blocks = [7, 8, 2, 3, 4, 9]  # three runs, out of order
    assert runs(blocks) == [(7, 2), (2, 3), (9, 1)]
    payload = make_kv(1, len(blocks), seed=1)[0]
    views = block_views(cache, blocks)
    assert views is not None and len(views) == 6
    check = Check(b"k" * 32)
    copy_into_views(memoryview(payload).cast("B"), views, check)
    assert np.array_equal(cache[:, blocks], payload)
    assert check.digest() == payload_digest(b"k" * 32, memoryview(payload).cast("B"))
    assert block_views(cache, list(range(0, 10, 2)) * (MAX_VIEWS // 8)) is None  # too scattered
    assert block_views(cache[:, ::2], [0]) is None  # not contiguous: no views
    with pytest.raises(ValueError):
        block_views(cache, [10])


@pytest.mark.parametrize("kind", ["tcp", "shm"])
@pytest.mark.parametrize("secret", [None, SECRET])
def test_chunks_land_in_the_blocks_without_a_write(kind: str, secret: bytes | None) -> None:
    """Scattered blocks, and layers split into several chunks by a small frame limit."""
    sink = ViewSink(2)
    blocks = [9, 3, 4, 5, 12, 0, 1]
    block_bytes = 2 * int(np.prod(SHAPE)) * 4
    config = TransferConfig(max_frame_bytes=3 * block_bytes + 64 * 1024)  # 3 blocks a chunk: a short last run
    sender, receiver = make_transfer_pair(kind, sink, config, secret=secret, timeout_s=5.0)
    kv = make_kv(2, len(blocks), seed=4)
    try:
        receiver.expect("r", 2, blocks)
        for layer in range(2):
            sender.send_layer("r", receiver.address(), layer, 2, blocks, kv[layer])
        assert settle(sender, receiver, "r") == (KVPoll.SUCCESS, KVPoll.SUCCESS)
        for layer in range(2):
            assert sink.kv[layer][:, blocks].tobytes() == kv[layer].tobytes()
        assert sink.writes == 0 and sink.viewed >= 2
        untouched = [b for b in range(sink.kv[0].shape[1]) if b not in blocks]
        assert not sink.kv[0][:, untouched].any()
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize(("kind", "secret", "why"), [
    ("tcp", None, "checksum mismatch"), ("shm", None, "checksum mismatch"),
    ("tcp", SECRET, "payload authentication failed"), ("shm", SECRET, "payload authentication failed")])
def test_a_corrupted_chunk_fails_the_request(kind: str, secret: bytes | None, why: str) -> None:
    sink = ViewSink(1)
    sender, receiver = make_transfer_pair(kind, sink, secret=secret, timeout_s=5.0)
    injector = faults.install(sender, corrupt_prob=1.0)
    try:
        receiver.expect("r", 1, [0, 1])
        sender.send_layer("r", receiver.address(), 0, 1, [0, 1], make_kv(1, 2)[0])
        assert settle(sender, receiver, "r") == (KVPoll.FAILED, KVPoll.FAILED)
        assert injector.corrupted == 1 and why in receiver.error("r") and sink.viewed == 1
        # the request is FAILED, so the bytes in its blocks are never used; a retry is accepted afresh
        receiver.expect("r2", 1, [0, 1])
        injector.corrupt_prob = 0.0
        kv = make_kv(1, 2, seed=9)[0]
        sender.send_layer("r2", receiver.address(), 0, 1, [0, 1], kv)
        assert settle(sender, receiver, "r2") == (KVPoll.SUCCESS, KVPoll.SUCCESS)
        assert sink.kv[0][:, [0, 1]].tobytes() == kv.tobytes()
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("kind", ["tcp", "shm"])
def test_a_wrong_key_is_refused_before_any_byte_lands(kind: str) -> None:
    sink = ViewSink(1)
    _, receiver = make_transfer_pair(kind, sink, secret=SECRET, timeout_s=5.0)
    sender, _unused = make_transfer_pair(kind, ViewSink(1), secret=b"another-secret", timeout_s=5.0)
    _unused.close()
    try:
        receiver.expect("r", 1, [0, 1])
        sender.send_layer("r", receiver.address(), 0, 1, [0, 1], make_kv(1, 2)[0])
        assert wait_for(lambda: sender.poll("r") is KVPoll.FAILED)  # the receiver drops the link
        assert receiver.poll("r") is KVPoll.BOOTSTRAPPING  # nothing of it was accepted
        assert sink.viewed == 0 and sink.writes == 0 and not sink.kv[0].any()
    finally:
        sender.close()
        receiver.close()


def test_a_digest_under_another_key_is_refused_after_landing() -> None:
    """A well-framed chunk (right frame key) whose payload digest is keyed differently still fails."""
    assert payload_key(SECRET) != payload_key(b"x")
    sink = ViewSink(1)
    sender, receiver = make_transfer_pair("tcp", sink, secret=SECRET, timeout_s=5.0)
    sender._payload_key = payload_key(b"x")  # frames tagged right, payload digests keyed wrong
    try:
        receiver.expect("r", 1, [0, 1])
        sender.send_layer("r", receiver.address(), 0, 1, [0, 1], make_kv(1, 2)[0])
        assert settle(sender, receiver, "r") == (KVPoll.FAILED, KVPoll.FAILED)
        assert "payload authentication failed" in receiver.error("r") and sink.viewed == 1
    finally:
        sender.close()
        receiver.close()


def test_the_check_reads_the_copy_not_the_segment() -> None:
    """A writer changing the segment between the copy and the hash cannot make checked bytes differ
    from the bytes in the blocks: the check is fed from the blocks."""
    key = b"k" * 32
    src = np.arange(2 * 3 * int(np.prod(SHAPE)), dtype=np.float32).view(np.uint8)
    cache = np.zeros((2, 4, *SHAPE), np.float32)

    class Meddler(Check):
        def update(self, piece: memoryview) -> None:
            src[:] ^= 0xFF  # another process rewrites the segment right after each piece is copied
            super().update(piece)

    views = block_views(cache, [0, 1, 2])
    assert views is not None
    check = Meddler(key)
    copy_into_views(memoryview(src), views, check)
    landed = cache[:, [0, 1, 2]].tobytes()
    assert check.digest() == payload_digest(key, landed)


def test_the_decode_cache_sink_offers_its_blocks(tiny_models) -> None:  # type: ignore[no-untyped-def]
    import torch

    from pdserve.config.engine import CacheConfig
    from pdserve.engine.model_runner import ModelRunner
    from pdserve.serve.kv_bridge import CacheSink as EngineSink
    from pdserve.serve.kv_bridge import blocks_as_array

    runner = ModelRunner(str(tiny_models["qwen2"]), CacheConfig(block_size=4, num_blocks=8), dtype="bfloat16")
    runner.kv_caches[1].copy_(torch.randn(runner.kv_caches[1].shape, generator=torch.Generator().manual_seed(1)))
    arr, dtype = blocks_as_array(runner, 1, [5, 1])
    sink = EngineSink(runner)
    views = sink.views(0, [2, 3, 6], dtype, (2, 3, *arr.shape[2:]))
    assert views is not None and len(views) == 4  # runs [2, 3] and [6], for K and for V
    three = np.concatenate([arr, arr[:, :1]], axis=1)  # blocks 5, 1, 5
    copy_into_views(memoryview(three.tobytes()), views, Check(None))
    assert torch.equal(runner.kv_caches[0][:, [2, 3, 6]], runner.kv_caches[1][:, [5, 1, 5]])
    with pytest.raises(ValueError):
        sink.views(0, [2], "float32", (2, 1, *arr.shape[2:]))


@pytest.mark.parametrize("kind", ["tcp", "shm", "fake"])
@pytest.mark.parametrize("secret", [None, SECRET])
def test_ungathered_blocks_are_gathered_by_the_sender(kind: str, secret: bytes | None) -> None:
    """The prefill side hands over its cache blocks; the link thread gathers them (shm: into the ring)."""
    src = np.stack(make_kv(1, 16, seed=6)[0:1])[0]  # a prefill cache: [2, 16 blocks, ...]
    blocks = [11, 2, 3, 4, 15, 7]
    block_bytes = 2 * int(np.prod(SHAPE)) * 4
    config = TransferConfig(max_frame_bytes=4 * block_bytes + 64 * 1024)  # two chunks, 4 + 2 blocks
    sink = ViewSink(1)
    sender, receiver = make_transfer_pair(kind, sink, config, secret=secret, timeout_s=5.0)
    try:
        receiver.expect("r", 1, [0, 1, 2, 3, 4, 5])
        sender.send_layer("r", receiver.address(), 0, 1, [0, 1, 2, 3, 4, 5], Blocks(src, blocks))
        assert settle(sender, receiver, "r") == (KVPoll.SUCCESS, KVPoll.SUCCESS)
        assert sink.kv[0][:, :6].tobytes() == src[:, blocks].tobytes()
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("kind", ["tcp", "shm"])
def test_corrupted_ring_bytes_of_ungathered_blocks_are_refused(kind: str) -> None:
    src = make_kv(1, 4, seed=2)[0]
    sink = ViewSink(1)
    sender, receiver = make_transfer_pair(kind, sink, secret=SECRET, timeout_s=5.0)
    injector = faults.install(sender, corrupt_prob=1.0)
    try:
        receiver.expect("r", 1, [0, 1])
        sender.send_layer("r", receiver.address(), 0, 1, [0, 1], Blocks(src, [3, 1]))
        assert settle(sender, receiver, "r") == (KVPoll.FAILED, KVPoll.FAILED)
        assert injector.corrupted == 1 and "payload authentication failed" in receiver.error("r")
    finally:
        sender.close()
        receiver.close()


def test_a_failed_request_is_not_reported_while_its_blocks_are_read() -> None:
    """The caller frees its blocks on FAILED: until the link thread has stopped reading them, poll()
    must not say so, or a reused block could be gathered into a transfer."""
    started, release = threading.Event(), threading.Event()

    class SlowBlocks(Blocks):
        def gather(self, out: np.ndarray | None = None) -> np.ndarray:
            started.set()
            assert release.wait(5)
            return super().gather(out)

    sink = ViewSink(1)
    sender, receiver = make_transfer_pair("tcp", sink, timeout_s=5.0)
    try:
        receiver.expect("r", 1, [0, 1])
        sender.send_layer("r", receiver.address(), 0, 1, [0, 1], SlowBlocks(make_kv(1, 2)[0], [0, 1]))
        assert started.wait(5)
        sender.abort("r")
        assert sender.poll("r") is KVPoll.TRANSFERRING  # aborted, but its blocks are being read
        release.set()
        assert wait_for(lambda: sender.poll("r") is KVPoll.FAILED)
    finally:
        release.set()
        sender.close()
        receiver.close()


def test_the_ring_takes_back_its_newest_region() -> None:
    ring = ShmRing(100)
    try:
        assert ring.alloc(60) == 0 and ring.alloc(30) == 60
        ring.free_oldest()
        assert ring.alloc(50) == 0  # wrapped
        ring.free_newest()  # back to one live region [60, 90): the next one goes after it
        assert ring.alloc(10) == 90
        ring.free_newest()
        ring.free_newest()
        assert ring.empty and ring.alloc(100) == 0
    finally:
        ring.destroy()
