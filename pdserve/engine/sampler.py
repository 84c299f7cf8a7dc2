"""Token sampling: greedy, temperature, top-k, top-p, with reproducible per-request seeds.

A seeded request's randomness is a pure function of (seed, output position): the token at position
i is argmax(logits / temperature + Gumbel noise) (the Gumbel-max trick: an exact draw from the
softmax), with the noise of every vocabulary entry taken from a SplitMix64 stream keyed by a hash of
(seed, i). Nothing else (batch, worker, device, earlier draws) enters, so a request resumed at
position k on another worker (its tokens so far appended to the prompt, `output_offset=k`) draws
exactly what it would have drawn. The noise of a whole batch is one set of integer tensor ops.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Named as in vLLM. `temperature == 0` is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    # Output tokens this request produced before this attempt (a resumed request re-prefills them
    # as part of its prompt): the position of its next token, which keys seeded randomness.
    output_offset: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k must be -1 (off) or >= 1"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (self.output_offset >= 0, "output_offset must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """A 64-bit pattern as the signed int torch's int64 holds."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def seed_key(seed: int, position: int) -> int:
    """The 64-bit key of a seeded request's draw at one output position."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return _i64(int.from_bytes(digest, "little"))


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniforms(keys: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, n] float64 in (0, 1): entry j of row r is SplitMix64 output j of the stream seeded
    with keys[r]. Integer ops wrap mod 2**64 alike on every device, so CPU and GPU agree."""
    z = keys.unsqueeze(-1) + torch.arange(1, n + 1, device=keys.device, dtype=torch.int64) * _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 11).double() + 0.5) * 2.0**-53


def draw(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Row r's token: an exact draw from softmax(logits[r]) (-inf: never drawn), keyed by keys[r]."""
    gumbel = -torch.log(-torch.log(uniforms(keys, logits.shape[-1])))
    return (logits.double() + gumbel).argmax(dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """One token per row. `steps[i]`: tokens generated so far by this worker for row i; with the
    request's `output_offset` that is the output position, which keys a seeded request's
    randomness, so the same request gives the same tokens on any worker, after preemption or
    failover."""
    out = logits.argmax(dim=-1).tolist()
    rows: list[int] = []
    scaled: list[torch.Tensor] = []
    keys: list[int] = []
    for row, (p, step) in enumerate(zip(params, steps, strict=True)):
        if p.greedy:
            continue
        x = logits[row].float() / p.temperature
        if p.top_k > 0:
            kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, idx = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            # Drop a token once the mass before it already reaches top_p (keeps at least one).
            drop = probs.cumsum(-1) - probs >= p.top_p
            x = x.scatter(0, idx, sorted_x.masked_fill(drop, float("-inf")))
        rows.append(row)
        scaled.append(x)
        # Unseeded requests take their key from torch's generator (torch.manual_seed still rules).
        keys.append(seed_key(p.seed, p.output_offset + step) if p.seed is not None
                    else int(torch.randint(-(2**63), 2**63 - 1, ())))
    if rows:
        key_t = torch.tensor(keys, dtype=torch.int64, device=logits.device)
        for row, tok in zip(rows, draw(torch.stack(scaled), key_t).tolist(), strict=True):
            out[row] = tok
    return out
