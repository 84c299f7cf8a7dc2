"""Router <-> worker connections: typed messages in authenticated, size-limited frames.

A worker runs an `RpcServer`; the router holds one `RpcClient` per worker. Messages carry request
ids, so one connection multiplexes every request between the pair. A malformed or unauthenticated
frame is logged and closes that connection only; the worker carries on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

import msgspec

from pdserve.serve.messages import ToRouter, ToWorker, decode_to_router, decode_to_worker, encode
from pdserve.transfer.frames import FrameError, read_frame, write_frame

log = logging.getLogger("pdserve.rpc")
MAX_CONTROL_FRAME = 16 * 1024 * 1024  # a 2M-token prompt as msgpack ints fits with room to spare


def cluster_secret() -> bytes | None:
    """The secret that authenticates every frame of the cluster: `PDSERVE_CLUSTER_SECRET`, or the
    content of the (0600) file `PDSERVE_CLUSTER_SECRET_FILE` names (the Ray launcher's way: the
    secret then appears in no process's environment)."""
    s = os.environ.get("PDSERVE_CLUSTER_SECRET")
    path = os.environ.get("PDSERVE_CLUSTER_SECRET_FILE")
    if not s and path:
        with open(path) as f:
            s = f.read().strip()
    return s.encode() if s else None


class Peer:
    """One side of a connection: serialized writes, a size limit, the shared secret."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes | None) -> None:
        self.reader, self.writer, self.secret = reader, writer, secret
        self._lock = asyncio.Lock()
        self.closed = False

    async def send(self, msg: ToWorker | ToRouter) -> None:
        if self.closed:
            raise ConnectionError("connection closed")
        async with self._lock:
            await write_frame(self.writer, encode(msg), b"", self.secret)

    async def recv_raw(self) -> bytes:
        header, _ = await read_frame(self.reader, MAX_CONTROL_FRAME, self.secret)
        return header

    def close(self) -> None:
        self.closed = True
        self.writer.close()


Handler = Callable[[ToWorker, Peer], Awaitable[None]]


class RpcServer:
    """Accepts router connections and hands each message to `handler`; `on_close(peer)` runs when
    a connection ends, however it ends."""

    def __init__(self, handler: Handler, host: str, port: int, secret: bytes | None,
                 on_close: Callable[[Peer], None] | None = None) -> None:
        self.handler, self.host, self.port, self.secret = handler, host, port, secret
        self.on_close = on_close
        self.server: asyncio.base_events.Server | None = None
        self.peers: set[Peer] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer, self.secret)
        self.peers.add(peer)
        try:
            while True:
                raw = await peer.recv_raw()
                try:
                    msg = decode_to_worker(raw)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    log.warning("rejected a malformed control message: %s", e)
                    break
                await self.handler(msg, peer)
        except FrameError as e:
            log.warning("rejected a frame (%s); closing that connection", e)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # shutting down: asyncio would otherwise log the cancelled handler as an error
        finally:
            self.peers.discard(peer)
            peer.closed = True
            writer.close()
            if self.on_close is not None:
                self.on_close(peer)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for p in list(self.peers):
            p.close()


class RpcClient:
    """The router's connection to one worker; replies are routed to per-request queues."""

    def __init__(self, address: str, secret: bytes | None) -> None:
        host, _, port = address.rpartition(":")
        self.address, self.host, self.port, self.secret = address, host or "127.0.0.1", int(port), secret
        self.peer: Peer | None = None
        self.queues: dict[str, asyncio.Queue[ToRouter | None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()

    @property
    def connected(self) -> bool:
        return self.peer is not None and not self.peer.closed

    async def connect(self, timeout: float = 2.0) -> None:
        async with self._connect_lock:
            if self.connected:
                return
            r, w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout)
            self.peer = Peer(r, w, self.secret)
            self._reader = asyncio.create_task(self._read_loop(self.peer))

    async def _read_loop(self, peer: Peer) -> None:
        try:
            while True:
                msg = decode_to_router(await peer.recv_raw())
                key = msg.nonce if hasattr(msg, "nonce") else msg.request_id  # type: ignore[union-attr]
                q = self.queues.get(key)
                if q is not None:
                    q.put_nowait(msg)
        except (asyncio.IncompleteReadError, ConnectionError, FrameError, msgspec.DecodeError,
                msgspec.ValidationError, OSError) as e:
            log.info("connection to %s lost: %s", self.address, e)
        finally:
            peer.closed = True
            peer.writer.close()
            for q in self.queues.values():  # wake everyone waiting on this worker
                q.put_nowait(None)

    def open(self, key: str) -> asyncio.Queue[ToRouter | None]:
        q: asyncio.Queue[ToRouter | None] = asyncio.Queue()
        self.queues[key] = q
        return q

    def close_queue(self, key: str) -> None:
        self.queues.pop(key, None)

    async def send(self, msg: ToWorker) -> None:
        await self.connect()
        assert self.peer is not None
        await self.peer.send(msg)

    async def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        if self._reader is not None:
            self._reader.cancel()
