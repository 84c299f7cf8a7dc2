"""Injected transfer faults for tests: a wrapper around a sender's transmit step.

`install(sender, corrupt_prob, cut_prob)` makes some chunks arrive with a byte flipped after
their checksum (or digest) was taken, and cuts the connection after some chunks, so tests see
the real receiver refuse corrupt KV and the real sender fail requests on a dropped link. The
plain send path knows nothing of this; a worker installs it only when its `TransferConfig`
asks for faults (`fault_corrupt_prob`, `fault_cut_prob`).
"""

from __future__ import annotations

import random
import socket

import numpy as np

from pdserve.config import TransferConfig
from pdserve.transfer.sender import KVSender, Outgoing, Transmit


class FaultInjector:
    """Corrupts or cuts after the real transmit step with the given probabilities, per chunk."""

    def __init__(self, inner: Transmit, corrupt_prob: float = 0.0, cut_prob: float = 0.0,
                 rng: random.Random | None = None) -> None:
        self.inner, self.corrupt_prob, self.cut_prob = inner, corrupt_prob, cut_prob
        self.rng = rng or random.Random()
        self.corrupted = 0
        self.cuts = 0

    def __call__(self, out: Outgoing) -> None:
        if self.corrupt_prob and out.data.nbytes and self.rng.random() < self.corrupt_prob:
            out = self._corrupt(out)
            self.corrupted += 1
        self.inner(out)
        if self.cut_prob and self.rng.random() < self.cut_prob:
            self.cuts += 1
            try:
                out.sock.shutdown(socket.SHUT_RDWR)  # the link drops mid-transfer
            except OSError:
                pass

    @staticmethod
    def _corrupt(out: Outgoing) -> Outgoing:
        broken = bytearray(out.data)
        broken[len(broken) // 2] ^= 0xFF
        if out.ring is None:  # the bytes are the frame payload
            return Outgoing(out.sock, out.chunk, broken, out.data, out.ring, out.secret)
        out.ring.put(out.chunk.shm_offset, np.frombuffer(bytes(broken), dtype=np.uint8))
        return out


def install(sender: KVSender, corrupt_prob: float = 0.0, cut_prob: float = 0.0,
            rng: random.Random | None = None) -> FaultInjector:
    """Wrap `sender`'s transmit step; call before the first send."""
    injector = FaultInjector(sender.transmit, corrupt_prob, cut_prob, rng)
    sender.transmit = injector
    return injector


def install_from_config(sender: KVSender, config: TransferConfig) -> FaultInjector | None:
    """The faults a `TransferConfig` asks for, if any (process-level fault tests set them)."""
    if not (config.fault_corrupt_prob or config.fault_cut_prob):
        return None
    return install(sender, config.fault_corrupt_prob, config.fault_cut_prob)
