"""KV transfer plane: push a prefill worker's KV into a decode worker's reserved blocks.

- `frames`: length-prefixed, size-limited, HMAC-authenticated frames (every pdserve socket).
- `protocol`: `KVPoll` states, typed chunk/ack/abort messages, the `KVSink` the decode engine gives.
- `receiver.KVReceiver` (decode side) and `sender.KVSender` (prefill side); each module's
  docstring walks a request through its states. Transports: `tcp` (across hosts, the default),
  `shm` (same host: bytes go through a shared-memory ring, headers over the socket; `shm` holds
  both ends of the segment and says what it trusts) and `fake` (in-process, for tests; `fake`).
- `blocks`: a chunk's payload laid over the cache blocks it belongs in, filled and checked in one pass.
- `faults`: injected corruption and cuts, a wrapper around the sender's transmit step.
"""

from __future__ import annotations

from pdserve.config import TransferConfig
from pdserve.transfer import faults
from pdserve.transfer.protocol import KVChunk, KVPoll, KVSink
from pdserve.transfer.receiver import KVReceiver
from pdserve.transfer.sender import KVSender

__all__ = ["KVChunk", "KVPoll", "KVReceiver", "KVSender", "KVSink", "make_transfer_pair"]


def make_transfer_pair(kind: str, sink: KVSink, config: TransferConfig | None = None,
                       secret: bytes | None = None, timeout_s: float = 30.0,
                       host: str = "127.0.0.1") -> tuple[KVSender, KVReceiver]:
    """A started receiver writing into `sink` and a sender; send to `receiver.address()`.

    `kind` is "tcp", "shm" or "fake". In a real cluster the two live in different processes;
    this is for tests, benchmarks and single-process setups.
    """
    receiver = KVReceiver(sink, config, host=host, secret=secret, timeout_s=timeout_s, transport=kind)
    receiver.start()
    sender = KVSender(config, secret=secret, timeout_s=timeout_s)
    if config is not None:
        faults.install_from_config(sender, config)
    return sender, receiver
