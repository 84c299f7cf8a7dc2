"""KV-size and transfer-time calculators (`pdserve kv-size`, `pdserve transfer-time`)."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.config.model import ModelShape
from pdserve.sim.hardware import Link


@dataclass(frozen=True)
class KVSize:
    bytes_per_token: int  # grouped-query attention as the model really is
    bytes_per_token_mha: int  # if every query head had its own KV head
    tokens: int

    @property
    def bytes_per_sequence(self) -> int:
        return self.bytes_per_token * self.tokens

    @property
    def bytes_per_sequence_mha(self) -> int:
        return self.bytes_per_token_mha * self.tokens


def kv_size(shape: ModelShape, tokens: int, dtype: str | None = None) -> KVSize:
    return KVSize(shape.kv_bytes_per_token(dtype), shape.kv_bytes_per_token_mha(dtype), tokens)


def transfer_time(num_bytes: float, link: Link) -> float:
    """The seed's estimator: protocol base latency + size / effective bandwidth (seconds)."""
    return link.latency_s + num_bytes / link.effective_bandwidth


@dataclass(frozen=True)
class LayeredTransfer:
    """KV sent layer by layer while prefill computes: layer i is ready at (i+1)/L of the prefill."""

    total_s: float  # from prefill start to the last byte arriving
    exposed_s: float  # time after prefill ends until the last byte arrives (what TTFT-to-decode sees)
    per_layer_s: float  # one layer's chunk on the wire
    link_bound: bool  # True if the link, not the prefill, paces the chunks


def layered_transfer(num_bytes: float, link: Link, layers: int, prefill_s: float) -> LayeredTransfer:
    """Per-layer chunks overlapping a prefill of `prefill_s` seconds.

    Chunk i can start when layer i is computed and the previous chunk is off the wire; each chunk
    pays the base latency once in flight (pipelined), so the finish time is computed exactly by
    walking the layers.
    """
    chunk = num_bytes / layers / link.effective_bandwidth
    wire_free = 0.0
    for i in range(layers):
        ready = prefill_s * (i + 1) / layers
        wire_free = max(wire_free, ready) + chunk
    total = wire_free + link.latency_s
    return LayeredTransfer(total, max(0.0, total - prefill_s), chunk, chunk > prefill_s / layers)


def fmt_bytes(n: float) -> str:
    """Decimal units (GB = 1e9 B), as NIC and datasheet figures are quoted."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"
