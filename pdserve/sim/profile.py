"""Measured step-time profiles and the model fitted to them.

Profile file (JSON), written by `pdserve profile` and read by `pdserve sim --profile`:

    {
      "model": "demo", "device": "cpu: 2 cores", "tp": 1, "dtype": "float32",
      "prefill": [[num_tokens, seconds], ...],          # one sequence of num_tokens, no cache
      "decode":  [[batch_size, context_len, seconds], ...]  # batch_size sequences, each context_len long
    }

Fitted forms (least squares on relative error, i.e. each point weighted by 1 / its time, so a
1-sequence step weighs as much as a 32 x 1024 one; coefficients clipped at zero):
    prefill(n_1..n_k)   = a_p + b_p * sum n_i + c_p * sum n_i^2     (linear layers + causal attention)
    decode(c_1..c_B)    = a_d + b_d * B + c_d * sum c_i              (per-sequence work + KV reads)
    mixed               = max(a_p, a_d) + the variable parts of both
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def _nnls(x: np.ndarray, y: np.ndarray, relative: bool = True) -> np.ndarray:
    """Least squares, then refit without any negative coefficient (tiny active-set NNLS).

    relative: minimise sum ((fit - y) / y)^2 instead of sum (fit - y)^2. Plain least squares lets
    the few slowest points (big batches, long contexts: seconds) decide the fit and drives the fixed
    per-step cost to 0, so small steps, the common case, come out several times too fast.
    """
    if relative:
        w = 1.0 / np.maximum(np.abs(y), 1e-12)
        x, y = x * w[:, None], y * w
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


@dataclass
class ProfiledModel:
    """A StepTimeModel with coefficients fitted to a measured profile."""

    prefill_coef: tuple[float, float, float]  # a_p, b_p, c_p
    decode_coef: tuple[float, float, float]  # a_d, b_d, c_d
    meta: dict[str, Any] | None = None

    @classmethod
    def fit(cls, profile: dict[str, Any]) -> ProfiledModel:
        pre = np.asarray(profile.get("prefill") or [], dtype=float)
        dec = np.asarray(profile.get("decode") or [], dtype=float)
        if len(pre) < 3 or len(dec) < 3:
            raise ValueError("a profile needs at least 3 prefill and 3 decode measurements")
        n = pre[:, 0]
        pc = _nnls(np.stack([np.ones_like(n), n, n * n], axis=1), pre[:, 1])
        b, c = dec[:, 0], dec[:, 1]
        dc = _nnls(np.stack([np.ones_like(b), b, b * c], axis=1), dec[:, 2])
        meta = {k: v for k, v in profile.items() if k not in ("prefill", "decode")}
        return cls(tuple(map(float, pc)), tuple(map(float, dc)), meta)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> ProfiledModel:
        return cls.fit(json.loads(Path(path).read_text()))

    def prefill_time(self, token_counts: list[int]) -> float:
        return self.mixed_time([(n, 0) for n in token_counts], [])

    def decode_time(self, context_lens: list[int]) -> float:
        return self.mixed_time([], context_lens)

    def mixed_time(self, prefill_chunks: list[tuple[int, int]], decode_contexts: list[int]) -> float:
        if not prefill_chunks and not decode_contexts:
            return 0.0
        ap, bp, cp = self.prefill_coef
        ad, bd, cd = self.decode_coef
        t = 0.0
        if prefill_chunks:
            # A chunk of n after `prior` cached tokens costs n^2 + 2 n prior in attention pairs.
            t += bp * sum(n for n, _ in prefill_chunks) + cp * sum(n * n + 2 * n * p for n, p in prefill_chunks)
        if decode_contexts:
            t += bd * len(decode_contexts) + cd * sum(decode_contexts)
        return t + max(ap if prefill_chunks else 0.0, ad if decode_contexts else 0.0)


def write_profile(path: str | Path, prefill: list[list[float]], decode: list[list[float]], **meta: Any) -> None:
    """Write a profile file in the format above (for `pdserve profile` and tests)."""
    Path(path).write_text(json.dumps({**meta, "prefill": prefill, "decode": decode}, indent=1))
