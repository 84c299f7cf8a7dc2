"""The decode side of KV transfer: accept chunks, verify them, write them into reserved blocks.

Lifecycle of one request on a decode worker::

    expect(rid, num_layers, block_ids)      the router reserved blocks          -> BOOTSTRAPPING
    first verified chunk written            sink.write(layer, blocks, ...)      -> TRANSFERRING
    every (layer, block) written            ack done=True to the sender         -> SUCCESS
    bad checksum / shape / blocks, abort,   further chunks are refused          -> FAILED
    drop(), connection lost, or no
    progress for timeout_s

A chunk counts only if its request was expected, it is not terminal, its blocks are among the
reserved ones and its bytes check out; so a SUCCESS request's KV is complete and intact, and
blocks of a FAILED (or dropped) request are never touched again once `drop()` returns. The bytes
check is the CRC without a cluster secret; with one, it is the keyed BLAKE3 digest the
(authenticated) header carries, for frame payloads and shm alike.

When the sink offers `views` of its blocks (`blocks`), an admitted chunk goes straight into them:
tcp receives the payload into the blocks, shm copies the segment into them, and the check is fed
piece by piece from the blocks as they fill (one pass over the bytes, not receive + verify +
scatter). The header is authentic before that (PDS2: its tag covers only prefix + header), the
blocks are the request's own, and a failed check fails the request, so unverified bytes there are
never used; bytes are hashed from the blocks, not the segment, so another process writing the
segment cannot inject KV. Otherwise (no views, a PDS1 frame under a secret, a chunk that will be
refused) the payload goes into one reused buffer per connection, is checked, and `sink.write`
copies it; shm bytes are copied out of the segment first under a secret.
One thread accepts connections and one thread serves each connection (one per prefill worker).
"""

from __future__ import annotations

import hmac
import socket
import threading
import time

import msgspec

from pdserve.config import TransferConfig
from pdserve.transfer import fake
from pdserve.transfer.blocks import Check, copy_into_views, recv_into_views
from pdserve.transfer.frames import FrameError, FrameHead, read_frame_head, recv_payload, write_frame_sync
from pdserve.transfer.protocol import (
    TERMINAL,
    KVAbort,
    KVAck,
    KVChunk,
    KVPoll,
    KVSink,
    checksum,
    chunk_error,
    decode_to_receiver,
    encode,
    payload_digest,
    payload_key,
)
from pdserve.transfer.shm import Segments
from pdserve.transfer.wire import Scratch, shutdown

_RETAIN_S = 300.0  # terminal requests are remembered this long, so late chunks are refused, then forgotten


class _Req:
    __slots__ = ("num_layers", "blocks", "got", "state", "last", "error", "writing")

    def __init__(self, num_layers: int, block_ids: list[int], now: float) -> None:
        self.num_layers = num_layers
        self.blocks = frozenset(block_ids)
        self.got: dict[int, set[int]] = {}
        self.state = KVPoll.BOOTSTRAPPING
        self.last = now
        self.error = ""
        self.writing = 0

    def complete(self) -> bool:
        return len(self.got) == self.num_layers and all(g == self.blocks for g in self.got.values())


class KVReceiver:
    """One per decode worker; serves many requests from many senders."""

    def __init__(self, sink: KVSink, config: TransferConfig | None = None, host: str = "127.0.0.1",
                 port: int = 0, secret: bytes | None = None, timeout_s: float = 30.0,
                 transport: str | None = None) -> None:
        self.config = config or TransferConfig()
        self.transport = transport or self.config.transport
        if self.transport not in ("tcp", "shm", "fake"):
            raise ValueError(f"transport must be tcp, shm or fake, got {self.transport!r}")
        self.sink, self.host, self.port, self.secret, self.timeout_s = sink, host, port, secret, timeout_s
        self._payload_key = payload_key(secret) if secret else None
        self._cond = threading.Condition()
        self._reqs: dict[str, _Req] = {}
        self._swept = time.monotonic()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._fake_id = ""

    # ---- public -------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and start serving (tcp/shm), or register in this process (fake)."""
        if self.transport == "fake":
            self._fake_id = fake.register(self)
            return
        self._listener = socket.create_server((self.host, self.port))
        self._listener.settimeout(0.2)  # lets the accept loop notice close()
        self.port = self._listener.getsockname()[1]
        self._spawn(self._accept_loop, "kv-recv-accept")

    def address(self) -> str:
        """Where senders send: "tcp://host:port", "shm://host:port" (control socket) or "fake://id"."""
        if self.transport == "fake":
            return f"fake://{self._fake_id}"
        return f"{self.transport}://{self.host}:{self.port}"

    def expect(self, request_id: str, num_layers: int, block_ids: list[int]) -> None:
        """Announce a request whose KV will land in `block_ids` (reserved by the caller)."""
        if num_layers < 1 or not block_ids:
            raise ValueError("expect() needs num_layers >= 1 and at least one block")
        now = time.monotonic()
        with self._cond:
            self._sweep(now)
            self._reqs[request_id] = _Req(num_layers, block_ids, now)

    def poll(self, request_id: str) -> KVPoll:
        """The request's state; a stalled one turns FAILED here. KeyError if never expected."""
        with self._cond:
            st = self._reqs[request_id]
            if (st.state not in TERMINAL and st.writing == 0
                    and time.monotonic() - st.last > self.timeout_s):
                st.state, st.error = KVPoll.FAILED, f"no progress for {self.timeout_s}s"
            return st.state

    def error(self, request_id: str) -> str:
        """Why a request FAILED ("" otherwise)."""
        with self._cond:
            st = self._reqs.get(request_id)
            return st.error if st else ""

    def drop(self, request_id: str) -> None:
        """Refuse further chunks for a request; on return no write to its blocks is in progress."""
        with self._cond:
            st = self._reqs.get(request_id)
            if st is None:  # dropped before expect: still refuse its chunks
                st = self._reqs[request_id] = _Req(1, [0], time.monotonic())
            if st.state is not KVPoll.SUCCESS:
                st.state, st.error = KVPoll.FAILED, st.error or "dropped by the receiver"
            st.last = time.monotonic()
            self._cond.wait_for(lambda: st.writing == 0, timeout=self.timeout_s)

    def close(self) -> None:
        """Stop serving; requests not yet complete become FAILED."""
        with self._cond:
            self._closed = True
            for st in self._reqs.values():
                if st.state not in TERMINAL:
                    st.state, st.error = KVPoll.FAILED, "receiver closed"
            conns = list(self._conns)
        for conn in conns:
            shutdown(conn)
        for t in self._threads:
            t.join(timeout=2)
        if self._listener is not None:
            self._listener.close()

    # ---- chunk handling (connection threads, and the fake sender's thread) ---------------------
    def handle_chunk(self, chunk: KVChunk, data: memoryview, seen: set[str] | None = None,
                     tag_covered: bool = False) -> KVAck:
        """Verify one chunk, write it through the sink, and say how it went.

        `tag_covered`: `data` was the payload of a frame whose tag (under the secret) covered it.
        """
        rid = chunk.request_id
        err = chunk_error(chunk, data.nbytes) or self._bytes_error(chunk, data, tag_covered)
        with self._cond:
            st = self._reqs.get(rid)
            if st is None or self._closed:
                return KVAck(rid, chunk.layer, ok=False, error="request not expected here")
            if seen is not None:
                seen.add(rid)
            if st.state is KVPoll.SUCCESS:  # a duplicate: the blocks may already be in use
                return KVAck(rid, chunk.layer, ok=True, done=True)
            if st.state is KVPoll.FAILED:
                return KVAck(rid, chunk.layer, ok=False, error=st.error)
            if not err and chunk.num_layers != st.num_layers:
                err = f"chunk says {chunk.num_layers} layers, {st.num_layers} expected"
            if not err and not st.blocks.issuperset(chunk.block_ids):
                err = "chunk names blocks that were not reserved for this request"
            if err:
                st.state, st.error = KVPoll.FAILED, err
                return KVAck(rid, chunk.layer, ok=False, error=err)
            st.writing += 1
            st.state, st.last = KVPoll.TRANSFERRING, time.monotonic()
        try:
            self.sink.write(chunk.layer, list(chunk.block_ids), chunk.dtype, tuple(chunk.shape), data)
            err = ""
        except Exception as e:  # the engine's problem, but it must fail the request, not the thread
            err = f"sink.write failed: {e!r}"
        return self._settle(st, chunk, err)

    def _settle(self, st: _Req, chunk: KVChunk, err: str) -> KVAck:
        """A chunk's write (or its direct receive) is over: record it and say how it went."""
        rid = chunk.request_id
        with self._cond:
            st.writing -= 1
            self._cond.notify_all()
            if st.state is KVPoll.FAILED:
                return KVAck(rid, chunk.layer, ok=False, error=st.error)
            if err:
                st.state, st.error = KVPoll.FAILED, err
                return KVAck(rid, chunk.layer, ok=False, error=err)
            st.got.setdefault(chunk.layer, set()).update(chunk.block_ids)
            st.last = time.monotonic()
            if st.complete():
                st.state = KVPoll.SUCCESS
            return KVAck(rid, chunk.layer, ok=True, done=st.state is KVPoll.SUCCESS)

    def _admit_direct(self, chunk: KVChunk, nbytes: int, seen: set[str]) -> tuple[_Req, list[memoryview]] | None:
        """The request and the views of its blocks when `chunk` may be received straight into them,
        else None (the caller takes the buffered path, whose checks then answer)."""
        views_of = getattr(self.sink, "views", None)
        if views_of is None or chunk_error(chunk, nbytes):
            return None
        if (self._payload_key is not None) != bool(chunk.digest):
            return None  # a digest without a secret here, or a secret without a digest: refused there
        with self._cond:
            st = self._reqs.get(chunk.request_id)
            if (st is None or self._closed or st.state in TERMINAL or chunk.num_layers != st.num_layers
                    or not st.blocks.issuperset(chunk.block_ids)):
                return None
            st.writing += 1  # from here drop() waits for the bytes to land
            seen.add(chunk.request_id)
            st.state, st.last = KVPoll.TRANSFERRING, time.monotonic()
        try:
            views = views_of(chunk.layer, list(chunk.block_ids), chunk.dtype, tuple(chunk.shape))
        except Exception as e:  # noqa: BLE001 - the sink refused: fail the request like a failed write
            self._settle(st, chunk, f"sink.views failed: {e!r}")
            return None
        if views is None or sum(v.nbytes for v in views) != nbytes:
            with self._cond:
                st.writing -= 1
                self._cond.notify_all()
            return None
        return st, views

    def _verdict(self, chunk: KVChunk, check: Check) -> str:
        if chunk.digest:
            return "" if hmac.compare_digest(check.digest(), chunk.digest) else "payload authentication failed"
        return "" if check.crc() == chunk.checksum else "checksum mismatch"

    def _receive_direct(self, conn: socket.socket, chunk: KVChunk, st: _Req, views: list[memoryview]) -> KVAck:
        """tcp: the payload goes from the socket into the blocks, hashed piece by piece as it lands."""
        check = Check(self._payload_key)
        try:
            recv_into_views(conn, views, check)
        except BaseException:
            self._settle(st, chunk, "connection lost mid-chunk")
            raise
        return self._settle(st, chunk, self._verdict(chunk, check))

    def _copy_direct(self, src: memoryview, chunk: KVChunk, st: _Req, views: list[memoryview]) -> KVAck:
        """shm: the segment's bytes are copied into the blocks and hashed from the blocks."""
        check = Check(self._payload_key)
        try:
            copy_into_views(src, views, check)
        except Exception as e:  # noqa: BLE001
            return self._settle(st, chunk, f"copy from shared memory failed: {e!r}")
        return self._settle(st, chunk, self._verdict(chunk, check))

    def fail(self, request_id: str, reason: str) -> None:
        with self._cond:
            st = self._reqs.get(request_id)
            if st is not None and st.state not in TERMINAL:
                st.state, st.error = KVPoll.FAILED, reason

    # ---- internals ----------------------------------------------------------------------------
    def _bytes_error(self, chunk: KVChunk, data: memoryview, tag_covered: bool) -> str:
        """Why the chunk's bytes are not the ones its sender sent, or ""."""
        key = self._payload_key
        if chunk.digest:
            if key is None:
                return "chunk carries a payload digest but no cluster secret is configured here"
            if not hmac.compare_digest(payload_digest(key, data), chunk.digest):
                return "payload authentication failed"
            return ""
        if key is not None and chunk.shm_name:
            return "shared-memory payload without a digest while a cluster secret is set"
        if key is not None and not tag_covered and chunk.nbytes:
            return "payload without a digest or a frame tag over it while a cluster secret is set"
        return "checksum mismatch" if checksum(data) != chunk.checksum else ""

    def _spawn(self, target, name: str, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _sweep(self, now: float) -> None:
        if now - self._swept < 10:
            return
        self._swept = now
        for rid in [r for r, s in self._reqs.items() if s.state in TERMINAL and now - s.last > _RETAIN_S]:
            del self._reqs[rid]

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            self._spawn(self._serve_conn, "kv-recv-conn", conn)

    def _serve_conn(self, conn: socket.socket) -> None:
        seen: set[str] = set()  # requests that moved over this connection die with it
        segments = Segments()
        scratch = Scratch()
        reason = "connection closed by the sender"
        try:
            while True:
                fh = read_frame_head(conn, self.config.max_frame_bytes, self.secret)
                ack = self._serve_frame(conn, fh, seen, segments, scratch)
                if ack is not None:
                    write_frame_sync(conn, encode(ack), secret=self.secret)
        except (EOFError, OSError) as e:
            reason = f"connection lost: {e!r}" if not isinstance(e, EOFError) else reason
        except (FrameError, msgspec.DecodeError, ValueError) as e:
            reason = f"bad frame, connection dropped: {e}"  # an unauthenticated peer gets nothing back
        finally:
            for rid in seen:
                self.fail(rid, reason)
            segments.close()
            with self._cond:
                self._conns.discard(conn)
            conn.close()


    def _serve_frame(self, conn: socket.socket, fh: FrameHead, seen: set[str], segments: Segments,
                     scratch: Scratch) -> KVAck | None:
        """One frame whose head is read: receive its payload, handle it, and return the ack (None: abort)."""
        msg = decode_to_receiver(fh.header)
        # Straight into the blocks only once the header is authentic (PDS2 tag checked) or no
        # secret is set; a PDS1 frame's header is trusted only after its payload is in.
        direct = (isinstance(msg, KVChunk) and (fh.split or self.secret is None)
                  and self._admit_direct(msg, msg.nbytes if msg.shm_name else fh.payload_len, seen))
        if direct and not msg.shm_name and fh.payload_len:
            return self._receive_direct(conn, msg, *direct)
        payload = memoryview(b"")
        if fh.payload_len:
            payload = scratch.take(fh.header, fh.payload_len)
            recv_payload(conn, fh, payload)
        fh.check_payload(self.secret, payload)
        covered = bool(self.secret) and not fh.split
        if isinstance(msg, KVAbort):
            self.fail(msg.request_id, f"aborted by the sender: {msg.reason}")
            return None
        if direct:  # shm, admitted: the one copy out of the segment is the scatter into the blocks
            try:
                view = segments.view(msg.shm_name, msg.shm_offset, msg.nbytes, msg.sender_pid)
            except BaseException as e:
                self._settle(direct[0], msg, f"bad shared-memory chunk: {e}")
                raise
            try:
                return self._copy_direct(view, msg, *direct)
            finally:
                view.release()
        if msg.shm_name and self._payload_key is not None:
            # Copied out before it is checked: a later write to the segment cannot
            # change what was verified.
            data = segments.copy(msg.shm_name, msg.shm_offset, msg.nbytes, msg.sender_pid)
            return self.handle_chunk(msg, data, seen)
        if msg.shm_name:  # no secret: same-user processes are trusted; read in place
            view = segments.view(msg.shm_name, msg.shm_offset, msg.nbytes, msg.sender_pid)
            try:
                return self.handle_chunk(msg, view, seen)
            finally:
                view.release()  # a segment cannot close while a view of it lives
        return self.handle_chunk(msg, payload, seen, tag_covered=covered)
