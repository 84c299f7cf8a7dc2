"""Which transport one (prefill, decode) pair uses, and which node a worker is on.

With `transfer.transport: auto` a decode worker advertises `tcp://host:port` (its receiver takes
tcp and shm chunks on the same socket) and says which node it is on; the prefill worker sends over
shared memory only when that node is its own, so a pair on one machine skips the network and a
pair across machines never tries shm. `tcp` and `shm` are used as given, for every pair.
"""

from __future__ import annotations

import os
import socket

NODE_ENV = "PDSERVE_NODE_ID"  # set by a launcher that knows better than the hostname (Ray's node id)


def node_identity() -> str:
    """This process's node: the launcher's word for it, else the host name."""
    return os.environ.get(NODE_ENV) or socket.gethostname()


def advertised(transport: str) -> str:
    """The scheme a decode worker's receiver advertises under a configured transport."""
    return "tcp" if transport == "auto" else transport


def scheme(address: str) -> str:
    """"tcp" of "tcp://host:port"."""
    return address.partition("://")[0]


def pair_address(kv_address: str, transport: str, sender_node: str, receiver_node: str) -> str:
    """The address a prefill worker sends one request's KV to (transport auto: shm iff same node)."""
    if transport != "auto" or scheme(kv_address) != "tcp":
        return kv_address
    same = bool(receiver_node) and receiver_node == sender_node
    return "shm://" + kv_address.partition("://")[2] if same else kv_address
