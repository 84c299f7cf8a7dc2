"""The prefill side of KV transfer: push each layer's KV into a decode worker's reserved blocks.

Lifecycle of one request on a prefill worker::

    send_layer(rid, dest, layer=0, ...)     queued; the caller goes back to compute  -> BOOTSTRAPPING
    a chunk goes out on the link            (one thread and connection per dest)     -> TRANSFERRING
    the receiver acks with done=True        every layer is written over there        -> SUCCESS
    a nack (corrupt, not reserved), abort(),                                         -> FAILED
    connection lost, or no progress for timeout_s

The caller frees its own KV blocks only after SUCCESS or FAILED. `send_layer` does not copy
`data`: pass an array nobody writes to until then (a gather such as `kv[:, block_ids]` is one), or
the blocks themselves (`Blocks`): poll() reports neither SUCCESS nor FAILED while a link thread
is still reading them, so blocks freed on a terminal state are never read again.
Link emulation (`TransferConfig.bandwidth_gbps`, `latency_ms`) sleeps before each chunk for
latency + bytes * 8 / bandwidth, on the link thread, so the caller never waits for it.

Each chunk leaves through `KVSender.transmit` (an `Outgoing` in, frame out): tests wrap it to
inject faults (`transfer.faults`), so the send path itself has none. Without a cluster secret the
bytes are CRC32-checked; with one they get a keyed BLAKE3 digest in the header (frame payload or
shm alike), and the frame's tag covers the header only, so each byte is hashed once here. tcp
sends straight from the caller's gathered array; shm copies it once into the ring. A caller may
pass `transfer.blocks.Blocks` (cache blocks not yet gathered) instead: the link thread then
gathers them, into the ring for shm (the digest taken from the cache blocks, which no other
process can write) or into one reused staging buffer for tcp, so the caller's thread copies nothing.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from pdserve.config import TransferConfig
from pdserve.transfer import fake
from pdserve.transfer.blocks import Blocks, Check
from pdserve.transfer.frames import read_frame_sync, write_frame_sync
from pdserve.transfer.protocol import (
    TERMINAL,
    KVAbort,
    KVAck,
    KVChunk,
    KVPoll,
    checksum,
    decode_ack,
    encode,
    payload_digest,
    payload_key,
)
from pdserve.transfer.shm import DEFAULT_RING_BYTES, ShmRing
from pdserve.transfer.wire import Outgoing, Transmit, send_chunk, shutdown

_RETAIN_S = 300.0
_HEADER_SLACK = 64 * 1024  # room for the chunk header inside max_frame_bytes


class _Req:
    __slots__ = ("dest", "num_layers", "state", "last", "error", "started", "reading")

    def __init__(self, dest: str, num_layers: int, now: float) -> None:
        self.dest, self.num_layers, self.last = dest, num_layers, now
        self.state, self.error, self.started = KVPoll.BOOTSTRAPPING, "", False
        self.reading = 0  # link threads delivering this request's ungathered `Blocks` right now


class _Conn:
    def __init__(self, sock: socket.socket, ring: ShmRing | None) -> None:
        self.sock, self.ring = sock, ring
        self.pending: deque[tuple[str, int | None]] = deque()  # (request, ring offset) awaiting an ack
        self.rids: set[str] = set()
        self.dead = False


class KVSender:
    """One per prefill worker; sends to any number of receivers ("tcp://", "shm://", "fake://")."""

    def __init__(self, config: TransferConfig | None = None, secret: bytes | None = None,
                 timeout_s: float = 30.0, shm_ring_bytes: int = DEFAULT_RING_BYTES,
                 transmit: Transmit = send_chunk) -> None:
        self.config = config or TransferConfig()
        self.shm_ring_bytes = shm_ring_bytes
        self.secret, self.timeout_s = secret, timeout_s
        self._payload_key = payload_key(secret) if secret else None
        self.transmit = transmit  # called on link threads; a wrapper may replace it before sending
        self._cond = threading.Condition()
        self._reqs: dict[str, _Req] = {}
        self._links: dict[str, _Link] = {}
        self._swept = time.monotonic()
        self._closed = False
        self.chunks_sent: dict[str, int] = {}  # per destination, for the metrics (each written by its link thread)

    def send_layer(self, request_id: str, dest: str, layer: int, num_layers: int, block_ids: list[int],
                   data: Any, dtype: str | None = None) -> None:
        """Queue one layer's KV, `data` shaped [2, len(block_ids), ...]; returns at once.

        `dtype` names the element type when `data` holds it as raw words (bf16 as uint16).
        """
        arr = data if isinstance(data, Blocks) else np.asarray(data)
        if len(arr.shape) < 2 or arr.shape[0] != 2 or arr.shape[1] != len(block_ids):
            raise ValueError(f"KV of shape {arr.shape} is not [2, {len(block_ids)}, ...]")
        if isinstance(arr, np.ndarray) and not arr.flags.c_contiguous:
            raise ValueError("KV data must be C-contiguous")
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise RuntimeError("KVSender is closed")
            self._sweep(now)
            st = self._reqs.get(request_id)
            changed = st is not None and (st.dest != dest or st.num_layers != num_layers)
            if st is None or (changed and st.state in TERMINAL):  # a retry elsewhere starts afresh
                st = self._reqs[request_id] = _Req(dest, num_layers, now)
            elif changed:
                raise ValueError(f"request {request_id!r} is in flight to {st.dest} with {st.num_layers} layers")
            if st.state in TERMINAL:
                return  # aborted or failed: the caller learns it from poll()
            st.last = now
            link = self._links.get(dest)
            if link is None:
                link = self._links[dest] = _Link(self, dest)
        per_block = max(1, arr.nbytes // len(block_ids))
        room = self.config.max_frame_bytes - min(_HEADER_SLACK, self.config.max_frame_bytes // 2)
        step = max(1, room // per_block)
        for i in range(0, len(block_ids), step):  # a layer above the frame limit goes in block runs
            if step >= len(block_ids):
                part = arr
            elif isinstance(arr, Blocks):
                part = arr.part(i, i + step)
            else:
                part = np.ascontiguousarray(arr[:, i:i + step])
            link.queue.put(("chunk", request_id, layer, num_layers, block_ids[i:i + step],
                            dtype or arr.dtype.name, part))

    def poll(self, request_id: str) -> KVPoll:
        """The request's state; a stalled one turns FAILED here. KeyError if never sent."""
        with self._cond:
            st = self._reqs[request_id]
            if st.state not in TERMINAL and time.monotonic() - st.last > self.timeout_s:
                self._fail(st, f"no progress for {self.timeout_s}s")
                link = self._links.get(st.dest)
                conn = link.conn if link else None
                if conn is not None and any(r == request_id for r, _ in conn.pending):
                    shutdown(conn.sock)  # the link is stuck; its reader thread fails the rest
            if st.state in TERMINAL and st.reading:
                return KVPoll.TRANSFERRING  # a link thread still reads the caller's blocks: not free yet
            return st.state

    def error(self, request_id: str) -> str:
        with self._cond:
            st = self._reqs.get(request_id)
            return st.error if st else ""

    def abort(self, request_id: str) -> None:
        """Stop sending a request and tell its receiver; poll() says FAILED from now on."""
        with self._cond:
            st = self._reqs.get(request_id)
            if st is None or st.state in TERMINAL:
                return
            self._fail(st, "aborted by the sender")
            if st.started:
                self._links[st.dest].queue.put(("abort", request_id))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for st in self._reqs.values():
                self._fail(st, "sender closed")
            links = list(self._links.values())
        for link in links:
            link.queue.put(None)
            if link.conn is not None:
                shutdown(link.conn.sock)
        for link in links:
            link.join(timeout=2)
            link.drop_conn()

    # ---- used by the link threads -------------------------------------------------------------
    def _fail(self, st: _Req, reason: str) -> None:
        if st.state not in TERMINAL:
            st.state, st.error = KVPoll.FAILED, reason
            self._cond.notify_all()  # a link thread may wait for ring space on behalf of st

    def _sweep(self, now: float) -> None:
        if now - self._swept < 10:
            return
        self._swept = now
        for rid in [r for r, s in self._reqs.items() if s.state in TERMINAL and now - s.last > _RETAIN_S]:
            del self._reqs[rid]

    def _on_ack(self, conn: _Conn | None, ack: KVAck) -> None:
        with self._cond:
            if conn is not None and conn.pending:
                _, off = conn.pending.popleft()
                if off is not None and conn.ring is not None:
                    conn.ring.free_oldest()
                self._cond.notify_all()
            st = self._reqs.get(ack.request_id)
            if st is None or st.state in TERMINAL:
                return
            st.last = time.monotonic()
            if not ack.ok:
                self._fail(st, f"receiver refused layer {ack.layer}: {ack.error}")
            elif ack.done:
                st.state = KVPoll.SUCCESS

    def _conn_lost(self, conn: _Conn, reason: str) -> None:
        with self._cond:
            if conn.dead:
                return
            conn.dead = True
            for rid in conn.rids:  # the receiver fails them too: a request never spans connections
                st = self._reqs.get(rid)
                if st is not None:
                    self._fail(st, reason)
            self._cond.notify_all()
        shutdown(conn.sock)


class _Link(threading.Thread):
    """One destination: a queue of chunks, one connection, one thread sending in order."""

    def __init__(self, sender: KVSender, dest: str) -> None:
        super().__init__(name=f"kv-send-{dest}", daemon=True)
        self.sender, self.dest = sender, dest
        self.scheme, _, where = dest.partition("://")
        if self.scheme not in ("tcp", "shm", "fake"):
            raise ValueError(f"unknown KV destination {dest!r}")
        self.where = where
        self.queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self.conn: _Conn | None = None
        self._stage = np.empty(0, np.uint8)
        self.start()

    def run(self) -> None:
        s = self.sender
        while (item := self.queue.get()) is not None:
            rid = item[1]
            if item[0] == "abort":
                if self.scheme == "fake" and (receiver := fake.lookup(self.where)) is not None:
                    receiver.fail(rid, "aborted by the sender")
                    continue
                conn = self.conn
                if conn is not None and not conn.dead and rid in conn.rids:
                    try:
                        write_frame_sync(conn.sock, encode(KVAbort(rid, "aborted by the sender")),
                                         secret=s.secret)
                    except OSError as e:
                        s._conn_lost(conn, f"connection lost: {e!r}")
                continue
            reads = isinstance(item[-1], Blocks)  # the caller's blocks are read until delivered
            with s._cond:
                st = s._reqs.get(rid)
                if st is None or st.state in TERMINAL:
                    continue
                st.reading += reads
            try:
                self._deliver(st, *item[1:])
            except Exception as e:  # noqa: BLE001 - any failure of one link fails its requests, not the thread
                with s._cond:
                    s._fail(st, f"send failed: {e!r}")
                if self.conn is not None:
                    s._conn_lost(self.conn, f"connection lost: {e!r}")
            finally:
                with s._cond:
                    st.reading -= reads

    def _deliver(self, st: _Req, rid: str, layer: int, num_layers: int, block_ids: list[int],
                 dtype: str, arr: np.ndarray) -> None:
        s, cfg = self.sender, self.sender.config
        if cfg.latency_ms or cfg.bandwidth_gbps:
            bw = arr.nbytes * 8 / (cfg.bandwidth_gbps * 1e9) if cfg.bandwidth_gbps else 0.0
            time.sleep(cfg.latency_ms / 1e3 + bw)
        key = s._payload_key
        into_ring = isinstance(arr, Blocks) and self.scheme == "shm" and arr.nbytes and arr.views() is not None
        if isinstance(arr, Blocks) and not into_ring:
            arr = arr.gather(self._staging(arr))  # tcp: one copy, into a buffer reused per link
        if into_ring:  # digest from the cache's own (private) blocks; the gather goes into the ring
            assert isinstance(arr, Blocks)
            check = Check(key)
            for view in arr.views() or []:
                check.update(view)
            digest = check.digest()
            data = memoryview(b"")
        else:
            data = memoryview(arr).cast("B") if arr.nbytes else memoryview(b"")
            digest = payload_digest(key, data) if key is not None else b""
        crc = 0 if digest else (check.crc() if into_ring else checksum(data))
        chunk = KVChunk(rid, layer, num_layers, list(block_ids), dtype, list(arr.shape), arr.nbytes, crc,
                        digest=digest)
        if self.scheme == "fake":
            receiver = fake.lookup(self.where)
            if receiver is None:
                raise ConnectionError(f"no fake receiver at {self.dest}")
            with s._cond:
                st.started, st.state = True, KVPoll.TRANSFERRING
            s._on_ack(None, receiver.handle_chunk(chunk, data))
            return
        conn = self._connect()
        off = None
        if conn.ring is not None:
            off = self._reserve(conn, st, arr.nbytes)
            if off is None:
                return
            if isinstance(arr, Blocks):
                data = conn.ring.gather(off, arr)
            else:
                conn.ring.put(off, arr)
            chunk = KVChunk(rid, layer, num_layers, chunk.block_ids, dtype, chunk.shape, chunk.nbytes,
                            chunk.checksum, conn.ring.name, off, os.getpid(), digest)
        with s._cond:
            if conn.dead:
                raise ConnectionError("connection lost")
            if st.state in TERMINAL:  # aborted or failed while this chunk was being prepared
                if off is not None:
                    conn.ring.free_newest()
                return
            conn.pending.append((rid, off))  # before writing: the ack may beat us back
            conn.rids.add(rid)
            st.started, st.state, st.last = True, KVPoll.TRANSFERRING, time.monotonic()
        try:
            s.transmit(Outgoing(conn.sock, chunk, b"" if off is not None else data, data, conn.ring, s.secret))
        finally:
            if into_ring:
                data.release()  # a view of the segment keeps it from closing
        s.chunks_sent[self.dest] = s.chunks_sent.get(self.dest, 0) + 1

    def _staging(self, blocks: Blocks) -> np.ndarray:
        """This link's gather buffer, grown on demand: a fresh array per chunk would be paged in anew."""
        if self._stage.nbytes < blocks.nbytes:
            self._stage = np.empty(blocks.nbytes, np.uint8)
        return self._stage[:blocks.nbytes].view(blocks.dtype).reshape(blocks.shape)

    def _reserve(self, conn: _Conn, st: _Req, n: int) -> int | None:
        """Room for n bytes in the ring, growing it when n alone does not fit; None if st ended."""
        s = self.sender
        with s._cond:
            while True:
                if conn.dead:
                    raise ConnectionError("connection lost")
                if st.state in TERMINAL:
                    return None
                assert conn.ring is not None
                off = conn.ring.alloc(n)
                if off is not None:
                    return off
                if conn.ring.empty:  # only a bigger segment can take it; the receiver maps the new name
                    conn.ring.destroy()
                    conn.ring = ShmRing(max(2 * conn.ring.capacity, n))
                elif not s._cond.wait(timeout=s.timeout_s):
                    raise TimeoutError("shared-memory ring stayed full")

    def _connect(self) -> _Conn:
        if self.conn is not None and not self.conn.dead:
            return self.conn
        self.drop_conn()
        host, _, port = self.where.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=self.sender.timeout_s)
        sock.settimeout(None)  # stalls are caught by poll() timeouts, which shut the socket down
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = _Conn(sock, ShmRing(self.sender.shm_ring_bytes) if self.scheme == "shm" else None)
        threading.Thread(target=self._read_acks, args=(self.conn,), name=f"kv-acks-{self.dest}",
                         daemon=True).start()
        return self.conn

    def _read_acks(self, conn: _Conn) -> None:
        s = self.sender
        try:
            while True:
                header, _ = read_frame_sync(conn.sock, 1024 * 1024, s.secret)
                s._on_ack(conn, decode_ack(header))
        except Exception as e:  # noqa: BLE001 - EOF, reset, bad frame: all end this connection
            s._conn_lost(conn, f"connection lost: {e!r}")

    def drop_conn(self) -> None:
        """Forget a dead connection; only the link thread (or close, after it) calls this."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.sock.close()
            if conn.ring is not None:
                conn.ring.destroy()

