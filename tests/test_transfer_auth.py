"""Authenticated shm payloads, the fault-injection wrapper, and the transfer modules' layering.

The attacker is real: a separate process maps the sender's shared-memory segment by name and
rewrites a chunk's bytes while its header is on the way, keeping the CRC32 unchanged.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
import zlib
from pathlib import Path

import msgspec
import pytest

from pdserve.transfer import KVPoll, KVReceiver, KVSender, faults, make_transfer_pair
from pdserve.transfer.sender import Outgoing, send_chunk
from pdserve.transfer.shm import ShmRing
from tests.test_transfer import CacheSink, make_kv, settle

SECRET = b"cluster-secret"
ROOT = Path(__file__).resolve().parents[1]

# Run in another process: map segment argv[1], flip byte argv[2] + argv[3] // 2 of the region
# [argv[2], argv[2] + argv[3]) and fix 4 other bytes so that the region's CRC32 stays the same.
# crc32 is affine: crc(a ^ d) = crc(a) ^ crc(d) ^ crc(0 * n), so a delta d with
# crc(d) == crc(0 * n) keeps it; d's free 32 bits are found by Gaussian elimination over GF(2).
FORGE = r"""
import sys, zlib
from multiprocessing import shared_memory
name, off, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
zero = zlib.crc32(bytes(n))
def lin(d): return zlib.crc32(bytes(d)) ^ zero
target = bytearray(n); target[n // 2] = 0xFF
free = 0 if n // 2 >= 4 else n - 4  # 4 bytes away from the flipped one
basis = {}  # pivot bit -> (value, delta)
for bit in range(32):
    d = bytearray(n); d[free + bit // 8] = 1 << (bit % 8)
    v = lin(d)
    for p in sorted(basis, reverse=True):
        if v >> p & 1:
            v ^= basis[p][0]; d = bytearray(x ^ y for x, y in zip(d, basis[p][1]))
    assert v, "dependent"
    basis[v.bit_length() - 1] = (v, d)
v, delta = lin(target), target
for p in sorted(basis, reverse=True):
    if v >> p & 1:
        v ^= basis[p][0]; delta = bytearray(x ^ y for x, y in zip(delta, basis[p][1]))
assert v == 0 and lin(delta) == 0 and any(delta)
if sys.version_info >= (3, 13):
    seg = shared_memory.SharedMemory(name, track=False)
else:  # do not let this process's resource tracker unlink the sender's segment at exit
    from multiprocessing import resource_tracker
    seg = shared_memory.SharedMemory(name)
    resource_tracker.unregister(seg._name, "shared_memory")
try:
    region = seg.buf[off:off + n]
    before = zlib.crc32(region)
    for i, x in enumerate(delta):
        region[i] ^= x
    assert zlib.crc32(region) == before
    region.release()
finally:
    seg.close()
"""


class Tamper:
    """A transmit wrapper: before a chunk's header leaves, another process rewrites its shm bytes."""

    def __init__(self, inner=send_chunk) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.forged = 0

    def __call__(self, out: Outgoing) -> None:
        assert out.ring is not None and out.chunk.shm_name
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run([sys.executable, "-c", FORGE, out.chunk.shm_name, str(out.chunk.shm_offset),
                        str(out.chunk.nbytes)], check=True, timeout=60, env=env)
        self.forged += 1
        self.inner(out)


def _shm_pair(secret: bytes | None, sink: CacheSink, transmit) -> tuple[KVSender, KVReceiver]:  # type: ignore[no-untyped-def]
    receiver = KVReceiver(sink, secret=secret, transport="shm", timeout_s=5.0)
    receiver.start()
    return KVSender(secret=secret, timeout_s=5.0, transmit=transmit), receiver


def test_forged_shm_bytes_with_the_same_crc_are_refused_under_a_secret() -> None:
    sink = CacheSink(2)
    tamper = Tamper()
    sender, receiver = _shm_pair(SECRET, sink, tamper)
    kv = make_kv(2, 2)
    try:
        receiver.expect("r", 2, [0, 1])
        sender.send_layer("r", receiver.address(), 0, 2, [0, 1], kv[0])
        assert settle(sender, receiver, "r") == (KVPoll.FAILED, KVPoll.FAILED)
        assert tamper.forged == 1
        assert "payload authentication failed" in receiver.error("r")
        assert "payload authentication failed" in sender.error("r")
        assert sink.writes == 0 and not sink.kv[0].any()
    finally:
        sender.close()
        receiver.close()


def test_without_a_secret_same_user_writers_are_trusted_as_documented() -> None:
    """No secret: shm bytes are only CRC-checked, so the same forgery lands (the README says so)."""
    sink = CacheSink(1)
    tamper = Tamper()
    sender, receiver = _shm_pair(None, sink, tamper)
    kv = make_kv(1, 2)
    try:
        receiver.expect("r", 1, [0, 1])
        sender.send_layer("r", receiver.address(), 0, 1, [0, 1], kv[0])
        assert settle(sender, receiver, "r") == (KVPoll.SUCCESS, KVPoll.SUCCESS)
        got = sink.kv[0][:, [0, 1]].tobytes()
        assert got != kv[0].tobytes() and zlib.crc32(got) == zlib.crc32(kv[0].tobytes())
    finally:
        sender.close()
        receiver.close()


def test_an_shm_chunk_stripped_of_its_digest_is_refused_under_a_secret() -> None:
    def downgrade(out: Outgoing) -> None:  # a header that falls back to the CRC
        chunk = msgspec.structs.replace(out.chunk, digest=b"", checksum=zlib.crc32(out.data))
        send_chunk(dataclasses.replace(out, chunk=chunk))

    sink = CacheSink(1)
    sender, receiver = _shm_pair(SECRET, sink, downgrade)
    try:
        receiver.expect("r", 1, [0])
        sender.send_layer("r", receiver.address(), 0, 1, [0], make_kv(1, 1)[0])
        assert settle(sender, receiver, "r") == (KVPoll.FAILED, KVPoll.FAILED)
        assert "without a digest" in receiver.error("r") and sink.writes == 0
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("kind", ["tcp", "shm"])
@pytest.mark.parametrize("secret", [None, SECRET])
def test_intact_transfers_pass_with_and_without_a_secret(kind: str, secret: bytes | None) -> None:
    sink = CacheSink(3)
    sender, receiver = make_transfer_pair(kind, sink, secret=secret, timeout_s=5.0)
    kv = make_kv(3, 4, seed=3)
    try:
        receiver.expect("r", 3, [2, 3, 4, 5])
        for layer in range(3):
            sender.send_layer("r", receiver.address(), layer, 3, [2, 3, 4, 5], kv[layer])
        assert settle(sender, receiver, "r") == (KVPoll.SUCCESS, KVPoll.SUCCESS)
        for layer in range(3):
            assert sink.kv[layer][:, [2, 3, 4, 5]].tobytes() == kv[layer].tobytes()
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize(("kind", "secret", "why"), [
    ("tcp", None, "checksum mismatch"), ("shm", None, "checksum mismatch"),
    ("tcp", SECRET, "payload authentication failed"), ("shm", SECRET, "payload authentication failed")])
def test_injected_corruption_is_refused(kind: str, secret: bytes | None, why: str) -> None:
    sink = CacheSink(1)
    sender, receiver = make_transfer_pair(kind, sink, secret=secret, timeout_s=5.0)
    injector = faults.install(sender, corrupt_prob=1.0)
    try:
        receiver.expect("r", 1, [0, 1])
        sender.send_layer("r", receiver.address(), 0, 1, [0, 1], make_kv(1, 2)[0])
        assert settle(sender, receiver, "r") == (KVPoll.FAILED, KVPoll.FAILED)
        assert injector.corrupted == 1 and why in receiver.error("r") and sink.writes == 0
    finally:
        sender.close()
        receiver.close()


def test_injected_cut_fails_the_request_and_the_next_one_reconnects() -> None:
    sink = CacheSink(2)
    sender, receiver = make_transfer_pair("tcp", sink, timeout_s=5.0)
    injector = faults.install(sender, cut_prob=1.0)
    kv = make_kv(2, 1)
    try:
        receiver.expect("cut", 2, [0])
        sender.send_layer("cut", receiver.address(), 0, 2, [0], kv[0])
        assert settle(sender, receiver, "cut") == (KVPoll.FAILED, KVPoll.FAILED)
        assert injector.cuts == 1 and "connection" in sender.error("cut")
        injector.cut_prob = 0.0
        receiver.expect("ok", 2, [1])
        for layer in range(2):
            sender.send_layer("ok", receiver.address(), layer, 2, [1], kv[layer])
        assert settle(sender, receiver, "ok") == (KVPoll.SUCCESS, KVPoll.SUCCESS)
    finally:
        sender.close()
        receiver.close()


def test_faults_come_only_from_a_config_that_asks_for_them() -> None:
    from pdserve.config import TransferConfig

    plain = KVSender()
    assert faults.install_from_config(plain, TransferConfig()) is None and plain.transmit is send_chunk
    injector = faults.install_from_config(plain, TransferConfig(fault_corrupt_prob=0.5))
    assert injector is not None and plain.transmit is injector and injector.corrupt_prob == 0.5
    plain.close()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="POSIX shared memory lives in /dev/shm")
def test_segments_are_private_to_their_user() -> None:
    ring = ShmRing(4096)
    try:
        assert os.stat(f"/dev/shm/{ring.name}").st_mode & 0o777 == 0o600
    finally:
        ring.destroy()


def _imports(module: str) -> set[str]:
    tree = ast.parse((ROOT / "pdserve" / "transfer" / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_sender_and_receiver_do_not_import_each_other() -> None:
    assert not any("receiver" in n for n in _imports("sender"))
    assert not any("sender" in n for n in _imports("receiver"))
    assert not any(n.endswith(("receiver", "sender")) for n in _imports("shm") | _imports("fake"))


def test_the_send_path_has_no_fault_injection() -> None:
    source = (ROOT / "pdserve" / "transfer" / "sender.py").read_text()
    assert "fault_" not in source and "random" not in source
