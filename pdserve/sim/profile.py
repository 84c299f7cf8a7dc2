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
    decode(c_1..c_B)    = a_d + b_d * B + c_d * B * max c_i          (per-sequence work + KV reads)
    mixed               = max(a_p, a_d) + the variable parts of both
The attention terms follow what this engine computes (`pdserve/model/attention.py`, dense SDPA
under a mask): a decode batch is padded to its longest context, so it reads B x max c_i, not
sum c_i; a prefill chunk of n tokens after `prior` cached ones scores n x (prior + n) pairs, not
the causal n^2/2 + n x prior (one-shot n^2 either way, which is what the profile measures). A
profile whose "attention" is "varlen" (an engine whose kernels skip the padding and the masked
half) uses sum c_i and n^2 + 2 n prior instead. "grouped" is this engine on a CPU since its decode
attention groups sequences by context length (`pdserve/model/attention.py` `group_decodes`): each
group pads to its longest context, a group costs an SDPA call worth GROUP_SLACK_KEYS keys, so a
batch reads sum over groups of (size x longest) + GROUP_SLACK_KEYS x (groups - 1); prefill chunks
as padded. A profile without the key is "padded" (profiles written before the grouping).
Serving overheads (optional, written by `pdserve calibrate`): what a served step and a served
request cost beyond the engine steps above (engine thread to event loop, a message per token, HTTP,
router and worker RPC, KV push bookkeeping), measured per cluster mode on a lightly loaded run:
    "serving": {"colocated": {"step_overhead_s": .., "request_overhead_s": ..}, "disagg": {...}}
`step_overhead_s` is added to every step; `request_overhead_s` delays each request's arrival.
Two more, measured on a real run (`pdserve calibrate` on its own run, `pdserve.bench.prefill_factors.
prefill_factors_from` on a recorded compare) from the engine's own timing of each prompt's step
(its "prefill" phase, first scheduled to first token):
    "prefill_factor": 1.1, "corun_prefill_factor": 1.3
the served step's time beyond its decodes' own (the prefill chunks' share, fixed cost included)
over the profile's, when no other worker of the host computes at the same time, and when one does.
They are inside the step, so a slow prefill stalls the decodes batched with it (a request overhead
would not); the second is the co-running one: the workers of a cluster measured on one host share
it (its cores' clocks, memory bandwidth, the router and client beside them), which the profile,
timed on an otherwise idle machine, cannot see. The simulator charges it to a prefill step that
starts while another instance is busy (`SimInstance.peers`). A third, measured the same way from
the decode-only steps' token gaps:
    "corun_decode_factor": 1.2
a decode-only step that starts while another instance of the host runs a prefill step takes this
much longer than one that starts while none does (both timed against the profile, so it is a ratio
of the two and the step overhead still applies to both): the peer's prompt contends for the same
cores' caches and memory bandwidth. A mixed step's co-running slowdown is all in
corun_prefill_factor (measured with its decodes' share as the profile has it), so this one is for
decode-only steps.
Decode steps inside the measured grid (batch sizes x contexts) are instead interpolated bilinearly
in (B, mean c_i) from the measurements themselves, as Vidur does: on CPU the step time is not
linear in B (one sequence takes a faster path, B = 2..8 cost 15-30% more than the plane through
all points), and the measured grid says so. Outside the grid the fitted plane extends it.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The engine's `pdserve.model.attention.GROUP_SLACK_KEYS` (that module imports torch; this one may not).
GROUP_SLACK_KEYS = 256
ATTENTION = ("padded", "grouped", "varlen")


def _nnls(x: np.ndarray, y: np.ndarray, relative: bool = True) -> np.ndarray:
    """Non-negative least squares, exact: the best least-squares fit over every subset of columns
    whose coefficients all come out non-negative (a model has 3 terms, so 7 subsets).

    relative: minimise sum ((fit - y) / y)^2 instead of sum (fit - y)^2. Plain least squares lets
    the few slowest points (big batches, long contexts: seconds) decide the fit and drives the fixed
    per-step cost to 0, so small steps, the common case, come out several times too fast.
    (A greedy drop-the-most-negative active set is not enough: on noisy small timings it dropped
    the fixed cost first and kept a slope 55% off every point, where a constant was within 40%.)
    """
    if relative:
        w = 1.0 / np.maximum(np.abs(y), 1e-12)
        x, y = x * w[:, None], y * w
    best, best_err = np.zeros(x.shape[1]), float(np.sum(y * y))
    for subset in itertools.chain.from_iterable(
            itertools.combinations(range(x.shape[1]), k) for k in range(1, x.shape[1] + 1)):
        cols = list(subset)
        sol, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if (sol < 0).any():
            continue
        err = float(np.sum((x[:, cols] @ sol - y) ** 2))
        if err < best_err * (1 - 1e-12):
            best, best_err = np.zeros(x.shape[1]), err
            best[cols] = sol
    return best


@dataclass
class ProfiledModel:
    """A StepTimeModel with coefficients fitted to a measured profile."""

    prefill_coef: tuple[float, float, float]  # a_p, b_p, c_p
    decode_coef: tuple[float, float, float]  # a_d, b_d, c_d
    meta: dict[str, Any] | None = None
    # Measured decode grid: (batch sizes, contexts, seconds[i][j]); None: the fitted plane only.
    decode_grid: tuple[list[float], list[float], list[list[float]]] | None = None
    step_overhead_s: float = 0.0  # serving cost per step beyond the engine's (see module doc)
    attention: str = "padded"  # how the engine's attention cost grows (module doc): one of ATTENTION
    prefill_factor: float = 1.0  # a served step's prefill share over the profile's (module doc)
    corun_prefill_factor: float = 1.0  # the same while another worker of the host computes
    corun_decode_factor: float = 1.0  # a decode-only step while another worker of the host prefills

    @property
    def shares_host(self) -> bool:
        """Whether a step's time depends on what the host's other instances do (module doc)."""
        return self.corun_prefill_factor != self.prefill_factor or self.corun_decode_factor != 1.0

    @classmethod
    def fit(cls, profile: dict[str, Any], mode: str | None = None) -> ProfiledModel:
        """Fit the profile's points; with `mode`, add that mode's measured serving step overhead."""
        pre = np.asarray(profile.get("prefill") or [], dtype=float)
        dec = np.asarray(profile.get("decode") or [], dtype=float)
        if len(pre) < 3 or len(dec) < 3:
            raise ValueError("a profile needs at least 3 prefill and 3 decode measurements")
        n = pre[:, 0]
        pc = _nnls(np.stack([np.ones_like(n), n, n * n], axis=1), pre[:, 1])
        b, c = dec[:, 0], dec[:, 1]
        dc = _nnls(np.stack([np.ones_like(b), b, b * c], axis=1), dec[:, 2])
        meta = {k: v for k, v in profile.items() if k not in ("prefill", "decode")}
        step = serving_overheads(profile, mode)[0] if mode else 0.0
        alone, corun, decode = host_factors(profile, mode) if mode else (1.0, 1.0, 1.0)
        attention = profile.get("attention", "padded")
        if attention not in ATTENTION:
            raise ValueError(f"profile attention {attention!r}: expected one of {', '.join(ATTENTION)}")
        return cls(tuple(map(float, pc)), tuple(map(float, dc)), meta, _grid(dec), step, attention,  # type: ignore[arg-type]
                   alone, corun, decode)

    @classmethod
    def load(cls, path: str | Path, mode: str | None = None) -> ProfiledModel:
        return cls.fit(json.loads(Path(path).read_text()), mode)

    def prefill_time(self, token_counts: list[int], corun: bool = False) -> float:
        return self.mixed_time([(n, 0) for n in token_counts], [], corun)

    def decode_time(self, context_lens: list[int], corun: bool = False) -> float:
        """corun: another instance of the host runs a prefill step as this one starts (module doc)."""
        t = self.mixed_time([], context_lens)
        if corun and context_lens and self.corun_decode_factor != 1.0:
            return self.corun_decode_factor * (t - self.step_overhead_s) + self.step_overhead_s
        return t

    def _plane(self, b: float, ctx_sum: float) -> float:
        ad, bd, cd = self.decode_coef
        return ad + bd * b + cd * ctx_sum

    def decode_run_times(self, context_lens: list[int], steps: int) -> list[float]:
        """decode_time for `steps` steps in a row (contexts + j), with the same arithmetic."""
        b, ad = len(context_lens), self.decode_coef[0]
        if b == 0:
            return [0.0] * steps
        total = self._ctx_total(context_lens)
        so = self.step_overhead_s
        return [((0.0 + (self._decode_total(b, total + j * b) - ad)) + ad) + so for j in range(steps)]

    def _ctx_total(self, contexts: list[int]) -> int:
        """The context tokens a decode batch's attention costs (module doc)."""
        if self.attention == "varlen":
            return sum(contexts)
        if self.attention == "padded":
            return len(contexts) * max(contexts)
        total, head, size, groups = 0, 0, 0, 0  # group_decodes: longest first, greedy
        for c in sorted(contexts, reverse=True):
            if size and head - c <= GROUP_SLACK_KEYS:
                size += 1
                continue
            total += size * head
            head, size, groups = c, 1, groups + 1
        return total + size * head + GROUP_SLACK_KEYS * (groups - 1)

    def _decode_total(self, b: int, total: int) -> float:
        """Decode part of a step, fixed cost included: the measured grid where it reaches, else the plane."""
        if self.decode_grid is None:
            return self._plane(b, total)
        bs, cs, t = self.decode_grid
        c = total / b
        bq, cq = min(max(b, bs[0]), bs[-1]), min(max(c, cs[0]), cs[-1])
        i = max(0, min(int(np.searchsorted(bs, bq)) - 1, len(bs) - 2)) if len(bs) > 1 else 0
        j = max(0, min(int(np.searchsorted(cs, cq)) - 1, len(cs) - 2)) if len(cs) > 1 else 0
        u = (bq - bs[i]) / (bs[i + 1] - bs[i]) if len(bs) > 1 else 0.0
        v = (cq - cs[j]) / (cs[j + 1] - cs[j]) if len(cs) > 1 else 0.0
        i1, j1 = min(i + 1, len(bs) - 1), min(j + 1, len(cs) - 1)
        grid = ((1 - u) * (1 - v) * t[i][j] + u * (1 - v) * t[i1][j] + (1 - u) * v * t[i][j1] + u * v * t[i1][j1])
        # Beyond the grid: the plane's change from the clamped point.
        return grid + self._plane(b, total) - self._plane(bq, bq * cq)

    def mixed_time(self, prefill_chunks: list[tuple[int, int]], decode_contexts: list[int],
                   corun: bool = False) -> float:
        """corun: another instance of the host computes as this step starts (module doc)."""
        if not prefill_chunks and not decode_contexts:
            return 0.0
        ap, bp, cp = self.prefill_coef
        ad, bd, cd = self.decode_coef
        t = 0.0
        if prefill_chunks:
            # A chunk of n after `prior` cached tokens scores n^2 + k n prior attention pairs (module doc).
            k = 2 if self.attention == "varlen" else 1  # scored pairs per (query, cached key): dense mask vs causal
            t += bp * sum(n for n, _ in prefill_chunks) + cp * sum(n * n + k * n * p for n, p in prefill_chunks)
        dec = 0.0
        if decode_contexts:
            dec = self._decode_total(len(decode_contexts), self._ctx_total(decode_contexts)) - ad
            t += dec
        t = t + max(ap if prefill_chunks else 0.0, ad if decode_contexts else 0.0)
        f = self.corun_prefill_factor if corun else self.prefill_factor
        if prefill_chunks and f != 1.0:
            alone = (dec + ad) if decode_contexts else 0.0  # the decodes' own step
            t = alone + f * (t - alone)
        return t + self.step_overhead_s

    def prefill_share(self, prefill_chunks: list[tuple[int, int]], decode_contexts: list[int]) -> tuple[float, float]:
        """(the decodes' own step, the rest of the step): the split `prefill_factor` scales,
        as the profile alone times it (no factors, no step overhead)."""
        bare = ProfiledModel(self.prefill_coef, self.decode_coef, self.meta, self.decode_grid, 0.0, self.attention)
        total = bare.mixed_time(prefill_chunks, decode_contexts)
        alone = bare.decode_time(decode_contexts) if decode_contexts else 0.0
        return alone, total - alone


def serving_overheads(profile: dict[str, Any], mode: str) -> tuple[float, float]:
    """(step_overhead_s, request_overhead_s) measured for `mode` ('colocated' | 'disagg'); 0 if none."""
    m = (profile.get("serving") or {}).get(mode) or {}
    return float(m.get("step_overhead_s", 0.0)), float(m.get("request_overhead_s", 0.0))


# The serving section's host-sharing factors (module doc), in the order host_factors returns them.
FACTOR_KEYS = ("prefill_factor", "corun_prefill_factor", "corun_decode_factor")


def host_factors(profile: dict[str, Any], mode: str) -> tuple[float, float, float]:
    """(prefill_factor, corun_prefill_factor, corun_decode_factor) measured for `mode`; 1.0 if
    none, the co-running prefill one the alone one if only that is there (module doc)."""
    m = (profile.get("serving") or {}).get(mode) or {}
    alone_key, corun_key, decode_key = FACTOR_KEYS
    alone = float(m.get(alone_key, 1.0))
    return alone, float(m.get(corun_key, alone)), float(m.get(decode_key, 1.0))


def _grid(dec: np.ndarray) -> tuple[list[float], list[float], list[list[float]]] | None:
    """The decode points as a full (batch size x context) table, or None if they do not form one."""
    bs, cs = sorted({float(x) for x in dec[:, 0]}), sorted({float(x) for x in dec[:, 1]})
    cell = {(float(b), float(c)): float(t) for b, c, t in dec}
    if len(cell) != len(dec) or len(cell) != len(bs) * len(cs):
        return None
    return bs, cs, [[cell[(b, c)] for c in cs] for b in bs]


def write_profile(path: str | Path, prefill: list[list[float]], decode: list[list[float]], **meta: Any) -> None:
    """Write a profile file in the format above (for `pdserve profile` and tests)."""
    Path(path).write_text(json.dumps({**meta, "prefill": prefill, "decode": decode}, indent=1))
