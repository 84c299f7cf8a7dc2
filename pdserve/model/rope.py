"""Rotary position embeddings, including Llama-3 style frequency scaling."""

from __future__ import annotations

import math
from typing import Any

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Per-pair inverse frequencies, adjusted as Hugging Face does for `rope_scaling`."""
    # On the CPU even inside `torch.device("meta")` (the loader builds there): an op on a meta
    # tensor runs a Python decomposition that imports torch._dynamo, ~1.5 s of a worker's start.
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


class RotaryEmbedding(torch.nn.Module):
    """One cos/sin table ([positions, head_dim], float32) grown on demand and indexed once per step."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_frequencies(head_dim, theta, scaling), persistent=False)
        self._cos = self._sin = torch.empty(0)

    def table(self, positions: torch.Tensor, need: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin rows ([T, head_dim]) for `positions` (all below `need`), from the cached table."""
        if need is None:  # costs a device sync; the runner passes it
            need = int(positions.max()) + 1 if positions.numel() else 0
        if self._cos.shape[0] < need or self._cos.device != self.inv_freq.device:
            size = max(need, 2 * self._cos.shape[0], 256)
            # The same float32 products Hugging Face forms (position x inv_freq), so values match.
            freqs = torch.arange(size, device=self.inv_freq.device).float()[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos[positions], self._sin[positions]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.table(positions)
        return apply_rope(q, k, cos.to(q.dtype), sin.to(q.dtype))


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [T, heads, head_dim]; cos, sin: [T, head_dim] (already in q's dtype)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x: [T, heads, head_dim]; cos, sin: [T, head_dim] (in x's dtype)."""
    return _rotate(x, cos[:, None, :], sin[:, None, :])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
