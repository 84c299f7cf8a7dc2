"""Token sampling: greedy, temperature, top-k, top-p, with reproducible per-request seeds."""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k must be -1 (off) or >= 1"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """One token per row. `steps[i]` (tokens generated so far) keys a seeded request's randomness,
    so the same request gives the same tokens on any worker, after preemption or failover."""
    out: list[int] = []
    greedy = logits.argmax(dim=-1).tolist()
    for row, (p, step) in enumerate(zip(params, steps, strict=True)):
        if p.greedy:
            out.append(greedy[row])
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
        probs = torch.softmax(x, dim=-1)
        gen = None
        if p.seed is not None:
            gen = torch.Generator(device="cpu").manual_seed((p.seed * 1_000_003 + step) % (2**63))
        out.append(int(torch.multinomial(probs.cpu(), 1, generator=gen).item()))
    return out
