"""KV transfer over real loopback sockets, real shared memory and the in-process fake."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pdserve.config import TransferConfig
from pdserve.transfer import KVPoll, KVReceiver, KVSender, make_transfer_pair
from pdserve.transfer.frames import write_frame_sync
from pdserve.transfer.protocol import KVChunk, checksum, encode

SHAPE = (4, 2, 8)  # block_size, kv_heads, head_dim
NUM_BLOCKS = 16


class CacheSink:
    """A decode worker's KV cache: one [2, NUM_BLOCKS, *SHAPE] array per layer."""

    def __init__(self, num_layers: int, dtype: str = "float32") -> None:
        self.kv = [np.zeros((2, NUM_BLOCKS, *SHAPE), dtype=dtype) for _ in range(num_layers)]
        self.writes = 0

    def write(self, layer: int, block_ids: list[int], dtype: str, shape: tuple[int, ...],
              data: memoryview) -> None:
        self.kv[layer][:, block_ids] = np.frombuffer(data, dtype=self.kv[layer].dtype).reshape(shape)
        self.writes += 1


def make_kv(num_layers: int, n_blocks: int, seed: int = 0, dtype: str = "float32") -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, n_blocks, *SHAPE)).astype(dtype) for _ in range(num_layers)]


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def settle(sender: KVSender, receiver: KVReceiver, rid: str, timeout: float = 30.0) -> tuple[KVPoll, KVPoll]:
    done = (KVPoll.SUCCESS, KVPoll.FAILED)
    wait_for(lambda: sender.poll(rid) in done and receiver.poll(rid) in done, timeout)
    return sender.poll(rid), receiver.poll(rid)


@pytest.fixture
def pair(request: pytest.FixtureRequest):
    kind, sink = request.param
    sender, receiver = make_transfer_pair(kind, sink, timeout_s=3.0)
    yield sender, receiver, sink
    sender.close()
    receiver.close()


@pytest.mark.parametrize("kind", ["tcp", "shm", "fake"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip_byte_exact(kind: str, dtype: str) -> None:
    layers, blocks = 4, [3, 7, 1, 9, 12]
    sink = CacheSink(layers, dtype)
    sender, receiver = make_transfer_pair(kind, sink, timeout_s=3.0)
    try:
        receiver.expect("r1", layers, blocks)
        assert receiver.poll("r1") is KVPoll.BOOTSTRAPPING
        kv = make_kv(layers, len(blocks), dtype=dtype)
        for layer in range(layers):
            sender.send_layer("r1", receiver.address(), layer, layers, blocks, kv[layer])
        assert settle(sender, receiver, "r1") == (KVPoll.SUCCESS, KVPoll.SUCCESS)
        for layer in range(layers):
            assert sink.kv[layer][:, blocks].tobytes() == kv[layer].tobytes()
        untouched = [b for b in range(NUM_BLOCKS) if b not in blocks]
        assert not sink.kv[0][:, untouched].any()
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("kind", ["tcp", "shm"])
def test_many_requests_split_layers_and_ring_growth(kind: str) -> None:
    """Layers above the frame limit go in block runs; chunks above the shm ring grow it."""
    layers = 3
    sink = CacheSink(layers)
    cfg = TransferConfig(max_frame_bytes=8192)  # one block is 2*4*2*8*4 = 512 bytes
    receiver = KVReceiver(sink, cfg, transport=kind, timeout_s=3.0)
    receiver.start()
    sender = KVSender(cfg, timeout_s=3.0, shm_ring_bytes=4096)
    try:
        reqs = {f"r{i}": list(range(i * 5, i * 5 + 5)) for i in range(3)}
        reqs["big"] = list(range(15, 16))
        kvs = {rid: make_kv(layers, len(b), seed=i) for i, (rid, b) in enumerate(reqs.items())}
        big = make_kv(layers, 16, seed=9)  # 8 KiB per layer: above the frame limit and the ring
        reqs["big"], kvs["big"] = list(range(16)), big
        for rid, b in reqs.items():
            receiver.expect(rid, layers, b)
        for layer in range(layers):
            for rid, b in reqs.items():
                if rid != "big":
                    sender.send_layer(rid, receiver.address(), layer, layers, b, kvs[rid][layer])
        for rid in ["r0", "r1", "r2"]:
            assert settle(sender, receiver, rid) == (KVPoll.SUCCESS, KVPoll.SUCCESS)
            for layer in range(layers):
                assert sink.kv[layer][:, reqs[rid]].tobytes() == kvs[rid][layer].tobytes()
        for layer in range(layers):
            sender.send_layer("big", receiver.address(), layer, layers, reqs["big"], big[layer])
        assert settle(sender, receiver, "big") == (KVPoll.SUCCESS, KVPoll.SUCCESS)
        for layer in range(layers):
            assert sink.kv[layer].tobytes() == big[layer].tobytes()
    finally:
        sender.close()
        receiver.close()


def _raw_chunk(rid: str, layer: int, num_layers: int, blocks: list[int], arr: np.ndarray,
               corrupt: bool = False) -> tuple[bytes, bytes]:
    data = bytearray(arr.tobytes())
    chunk = KVChunk(rid, layer, num_layers, blocks, arr.dtype.name, list(arr.shape), len(data),
                    checksum(bytes(data)))
    if corrupt:
        data[len(data) // 2] ^= 0x40  # flipped after the checksum was taken
    return encode(chunk), bytes(data)


def _connect(receiver: KVReceiver) -> socket.socket:
    host, port = receiver.address().split("://")[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)))


def test_corrupt_chunk_fails_and_never_succeeds() -> None:
    sink = CacheSink(2)
    receiver = KVReceiver(sink, timeout_s=3.0)
    receiver.start()
    kv = make_kv(2, 2)
    try:
        receiver.expect("bad", 2, [0, 1])
        receiver.expect("probe", 1, [2, 3])
        with _connect(receiver) as sock:
            write_frame_sync(sock, *_raw_chunk("bad", 0, 2, [0, 1], kv[0], corrupt=True))
            assert wait_for(lambda: receiver.poll("bad") is KVPoll.FAILED)
            assert "checksum" in receiver.error("bad")
            for layer in range(2):  # the intact chunks that follow do not revive it
                write_frame_sync(sock, *_raw_chunk("bad", layer, 2, [0, 1], kv[layer]))
            # A chunk behind them on the same connection: once it has landed, they were handled.
            write_frame_sync(sock, *_raw_chunk("probe", 0, 1, [2, 3], kv[0]))
            assert wait_for(lambda: receiver.poll("probe") is KVPoll.SUCCESS)
        assert receiver.poll("bad") is KVPoll.FAILED and sink.writes == 1  # the probe's write only
    finally:
        receiver.close()


@pytest.mark.parametrize("kind", ["tcp", "shm"])
def test_corrupt_chunk_reported_to_sender(kind: str) -> None:
    """A chunk corrupted in flight (after its checksum): the receiver refuses it and writes nothing,
    and the sender learns the transfer failed, and why."""
    sink = CacheSink(2)
    sender, receiver = make_transfer_pair(kind, sink, TransferConfig(fault_corrupt_prob=1.0), timeout_s=3.0)
    try:
        receiver.expect("r", 2, [0, 1])
        sender.send_layer("r", receiver.address(), 0, 2, [0, 1], make_kv(2, 2)[0])
        assert settle(sender, receiver, "r") == (KVPoll.FAILED, KVPoll.FAILED)
        assert "checksum" in receiver.error("r") and "checksum" in sender.error("r")
        assert sink.writes == 0
    finally:
        sender.close()
        receiver.close()


def test_unreserved_block_reported_to_sender_through_fake() -> None:
    sink = CacheSink(1)
    sender, receiver = make_transfer_pair("fake", sink, timeout_s=3.0)
    receiver.expect("r", 1, [0, 1, 2])
    sender.send_layer("r", receiver.address(), 0, 1, [0, 1], make_kv(1, 2)[0])  # block 2 never comes
    sender.send_layer("r", receiver.address(), 0, 1, [0, 5], make_kv(1, 2)[0])  # 5 was not reserved
    assert settle(sender, receiver, "r") == (KVPoll.FAILED, KVPoll.FAILED)
    assert "not reserved" in sender.error("r")
    sender.close()
    receiver.close()


def test_sender_killed_mid_transfer_fails_receiver() -> None:
    sink = CacheSink(3)
    receiver = KVReceiver(sink, timeout_s=3.0)
    receiver.start()
    receiver.expect("r", 3, [0, 1])
    script = (
        "import os, time, numpy as np\n"
        "from pdserve.transfer import KVSender\n"
        "s = KVSender()\n"
        f"s.send_layer('r', {receiver.address()!r}, 0, 3, [0, 1], np.ones((2, 2, 4, 2, 8), np.float32))\n"
        "while s.poll('r').name != 'TRANSFERRING': time.sleep(0.01)\n"
        "time.sleep(0.2)\n"
        "os._exit(9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=30, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 9
    assert wait_for(lambda: receiver.poll("r") is KVPoll.FAILED)
    assert sink.writes == 1 and "connection" in receiver.error("r")
    receiver.close()


def test_receiver_gone_and_stall_fail_sender_after_timeout() -> None:
    receiver = KVReceiver(CacheSink(2), timeout_s=30.0)  # closed below, never timed out: "r" stays TRANSFERRING until then
    receiver.start()
    receiver.expect("r", 2, [0])
    receiver.expect("never", 2, [0])
    sender = KVSender(timeout_s=0.5)
    sender.send_layer("r", receiver.address(), 0, 2, [0], make_kv(1, 1)[0])
    assert wait_for(lambda: receiver.poll("r") is KVPoll.TRANSFERRING)
    receiver.close()  # the decode worker goes away mid-transfer
    assert wait_for(lambda: sender.poll("r") is KVPoll.FAILED)
    assert receiver.poll("never") is KVPoll.FAILED  # nothing ever arrived
    # A peer that accepts and never answers: the sender gives up after its timeout, without hanging.
    silent = socket.create_server(("127.0.0.1", 0))
    sender.send_layer("s", f"tcp://127.0.0.1:{silent.getsockname()[1]}", 0, 1, [0], make_kv(1, 1)[0])
    assert not wait_for(lambda: sender.poll("s") is KVPoll.FAILED, 0.3)
    assert wait_for(lambda: sender.poll("s") is KVPoll.FAILED, 10.0)
    assert "no progress" in sender.error("s")
    sender.send_layer("x", "tcp://127.0.0.1:1", 0, 1, [0], make_kv(1, 1)[0])  # nobody listens
    assert wait_for(lambda: sender.poll("x") is KVPoll.FAILED)
    sender.close()
    silent.close()


def test_receiver_times_out_without_progress() -> None:
    receiver = KVReceiver(CacheSink(1), timeout_s=0.3, transport="fake")
    receiver.start()
    receiver.expect("r", 1, [0])
    assert receiver.poll("r") is KVPoll.BOOTSTRAPPING
    assert wait_for(lambda: receiver.poll("r") is KVPoll.FAILED, 10.0)
    receiver.close()


@pytest.mark.parametrize("kind", ["tcp", "shm"])
def test_wrong_secret_rejected(kind: str) -> None:
    sink = CacheSink(1)
    receiver = KVReceiver(sink, secret=b"right", transport=kind, timeout_s=0.5)
    receiver.start()
    receiver.expect("r", 1, [0])
    sender = KVSender(secret=b"wrong", timeout_s=0.5)
    sender.send_layer("r", receiver.address(), 0, 1, [0], make_kv(1, 1)[0])
    assert settle(sender, receiver, "r") == (KVPoll.FAILED, KVPoll.FAILED)
    assert sink.writes == 0
    sender.close()
    receiver.close()


def test_oversize_frame_rejected() -> None:
    sink = CacheSink(1)
    receiver = KVReceiver(sink, TransferConfig(max_frame_bytes=4096), timeout_s=3.0)
    receiver.start()
    receiver.expect("r", 1, list(range(16)))
    with _connect(receiver) as sock:
        write_frame_sync(sock, *_raw_chunk("r", 0, 1, list(range(16)), make_kv(1, 16)[0]))  # 8 KiB
        sock.settimeout(3)
        try:  # the receiver hung up instead of reading 8 KiB (a reset: it left bytes unread)
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
    assert sink.writes == 0 and receiver.poll("r") is not KVPoll.SUCCESS
    receiver.close()


@pytest.mark.parametrize("kind", ["tcp", "fake"])
def test_abort_and_drop(kind: str) -> None:
    sink = CacheSink(3)
    sender, receiver = make_transfer_pair(kind, sink, timeout_s=3.0)
    kv = make_kv(3, 2)
    receiver.expect("a", 3, [0, 1])
    receiver.expect("d", 3, [2, 3])
    sender.send_layer("a", receiver.address(), 0, 3, [0, 1], kv[0])
    sender.send_layer("d", receiver.address(), 0, 3, [2, 3], kv[0])
    assert wait_for(lambda: receiver.poll("a") is KVPoll.TRANSFERRING and receiver.poll("d") is KVPoll.TRANSFERRING)
    sender.abort("a")
    assert sender.poll("a") is KVPoll.FAILED
    sender.send_layer("a", receiver.address(), 1, 3, [0, 1], kv[1])  # ignored after abort
    assert wait_for(lambda: receiver.poll("a") is KVPoll.FAILED)
    receiver.drop("d")
    assert receiver.poll("d") is KVPoll.FAILED
    writes = sink.writes
    sender.send_layer("d", receiver.address(), 1, 3, [2, 3], kv[1])
    sender.send_layer("d", receiver.address(), 2, 3, [2, 3], kv[2])
    assert wait_for(lambda: sender.poll("d") is KVPoll.FAILED)
    assert sink.writes == writes and not sink.kv[1].any()
    sender.close()
    receiver.close()


def test_link_emulation_takes_at_least_the_emulated_time() -> None:
    cfg = TransferConfig(bandwidth_gbps=0.01, latency_ms=200.0)
    layers, blocks = 3, [0, 1, 2, 3]
    sink = CacheSink(layers)
    sender, receiver = make_transfer_pair("tcp", sink, config=cfg, timeout_s=5.0)
    kv = make_kv(layers, len(blocks))
    emulated = sum(cfg.latency_ms / 1e3 + a.nbytes * 8 / (cfg.bandwidth_gbps * 1e9) for a in kv)
    receiver.expect("r", layers, blocks)
    t0 = time.monotonic()
    for layer in range(layers):
        sender.send_layer("r", receiver.address(), layer, layers, blocks, kv[layer])
    # Order, not speed: every call returned before the first chunk could cross the emulated link,
    # so the caller (the prefill compute loop) never waits for it.
    assert sink.writes == 0 and receiver.poll("r") is not KVPoll.SUCCESS
    assert settle(sender, receiver, "r") == (KVPoll.SUCCESS, KVPoll.SUCCESS)
    assert time.monotonic() - t0 >= emulated
    sender.close()
    receiver.close()


def test_concurrent_senders_to_one_receiver() -> None:
    layers = 2
    sink = CacheSink(layers)
    receiver = KVReceiver(sink, transport="shm", timeout_s=3.0)
    receiver.start()
    senders = [KVSender(timeout_s=3.0) for _ in range(3)]
    kvs = [make_kv(layers, 4, seed=i) for i in range(3)]
    for i in range(3):
        receiver.expect(f"r{i}", layers, list(range(4 * i, 4 * i + 4)))

    def run(i: int) -> None:
        for layer in range(layers):
            senders[i].send_layer(f"r{i}", receiver.address(), layer, layers, list(range(4 * i, 4 * i + 4)),
                                  kvs[i][layer])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        assert settle(senders[i], receiver, f"r{i}") == (KVPoll.SUCCESS, KVPoll.SUCCESS)
        for layer in range(layers):
            assert sink.kv[layer][:, 4 * i:4 * i + 4].tobytes() == kvs[i][layer].tobytes()
        senders[i].close()
    receiver.close()
