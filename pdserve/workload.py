"""Request workloads: length distributions, named presets, arrival processes and trace files.

Shared by the benchmark client (`pdserve bench`) and the simulator (`pdserve sim`, `pdserve plan`),
so both see the same requests for the same (workload, rate, seed). Everything is seeded.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LengthSampler = Callable[[random.Random], int]


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: when (seconds from the start), prompt length and output length.

    `hash_ids`: a trace's per-block prefix hashes (Mooncake layout); requests sharing a leading run
    of ids share that prefix. Empty: the prompt shares nothing.
    """

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: 'uniform' on [lo, hi], or 'lognormal' (median, sigma) clipped to [lo, hi]."""

    kind: str
    lo: int
    hi: int
    median: float = 0.0
    sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "lognormal"):
            raise ValueError(f"length distribution must be 'uniform' or 'lognormal', got {self.kind!r}")
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"need 1 <= lo <= hi, got lo={self.lo} hi={self.hi}")
        if self.kind == "lognormal" and (self.median <= 0 or self.sigma < 0):
            raise ValueError("lognormal needs median > 0 and sigma >= 0")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "uniform":
            return rng.randint(self.lo, self.hi)
        x = rng.lognormvariate(math.log(self.median), self.sigma)
        return int(min(self.hi, max(self.lo, round(x))))

    @property
    def mean(self) -> float:
        """Mean before clipping for lognormal (good enough for capacity bounds)."""
        if self.kind == "uniform":
            return (self.lo + self.hi) / 2
        return min(self.hi, self.median * math.exp(self.sigma**2 / 2))


def length_dist(kind: str, lo: int = 1, hi: int = 1, median: float = 0.0, sigma: float = 0.0) -> LengthDist:
    """`length_dist('uniform', lo, hi)` or `length_dist('lognormal', lo, hi, median=, sigma=)`."""
    return LengthDist(kind, int(lo), int(hi), float(median), float(sigma))


@dataclass(frozen=True)
class WorkloadSpec:
    """A named mix of prompt and output lengths."""

    name: str
    prompt: LengthDist
    output: LengthDist


def _u(lo: int, hi: int) -> LengthDist:
    return LengthDist("uniform", lo, hi)


# The three workload shapes of the article pdserve was designed from (search, chatbot,
# summarization), plus variants that fit the demo model's 2,048-token context.
PRESETS: dict[str, WorkloadSpec] = {
    "search": WorkloadSpec("search", _u(50, 500), _u(5, 20)),
    "chatbot": WorkloadSpec("chatbot", _u(2000, 4000), _u(200, 500)),
    "summarization": WorkloadSpec("summarization", _u(3000, 8000), _u(50, 150)),
    "search-small": WorkloadSpec("search-small", _u(16, 128), _u(4, 16)),
    "chatbot-small": WorkloadSpec("chatbot-small", _u(256, 768), _u(64, 192)),
    "summarization-small": WorkloadSpec("summarization-small", _u(512, 1500), _u(16, 64)),
    "uniform": WorkloadSpec("uniform", _u(128, 1024), _u(32, 256)),
    # Long prompts, short answers (summarization / RAG), scaled so a sweep fits 2 CPU cores with
    # the demo model: prefill of one prompt costs tens of decode steps, the regime where prefill
    # interrupts a colocated batch's decodes (issue 12).
    "longprompt-small": WorkloadSpec("longprompt-small", _u(640, 1024), _u(48, 128)),
    # Medians/p90 roughly those of the Azure conversation trace.
    "lognormal": WorkloadSpec(
        "lognormal",
        LengthDist("lognormal", 8, 8192, median=1000, sigma=0.8),
        LengthDist("lognormal", 1, 2048, median=130, sigma=0.9),
    ),
}


def custom_workload(prompt: LengthDist, output: LengthDist, name: str = "custom") -> WorkloadSpec:
    return WorkloadSpec(name, prompt, output)


def _scaled(p: int, o: int, length_scale: float, max_prompt_tokens: int | None,
            max_output_tokens: int | None) -> tuple[int, int]:
    p = max(1, round(p * length_scale))
    o = max(1, round(o * length_scale))
    if max_prompt_tokens is not None:
        p = min(p, max_prompt_tokens)
    if max_output_tokens is not None:
        o = min(o, max_output_tokens)
    return p, o


def _csv_rows(path: str | Path) -> list[tuple[float | None, int, int, tuple[int, ...]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"num_prefill_tokens", "num_decode_tokens"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns {sorted(need)} (and optionally arrived_at), "
                             f"got {reader.fieldnames}")
        timed = "arrived_at" in reader.fieldnames
        return [(float(row["arrived_at"]) if timed else None, int(row["num_prefill_tokens"]),
                 int(row["num_decode_tokens"]), ()) for row in reader]


def _mooncake_rows(path: str | Path) -> list[tuple[float | None, int, int, tuple[int, ...]]]:
    """Mooncake's JSONL: one object per line with timestamp (ms), input_length, output_length, hash_ids."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                ts = obj.get("timestamp")
                rows.append((float(ts) / 1e3 if ts is not None else None, int(obj["input_length"]),
                             int(obj["output_length"]), tuple(int(h) for h in obj.get("hash_ids", []))))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a Mooncake trace line ({e})") from None
    return rows


def load_trace(
    path: str | Path,
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
) -> list[RequestSpec]:
    """Read a trace: a CSV (num_prefill_tokens,num_decode_tokens[,arrived_at]; Vidur's layout) or
    Mooncake JSONL (.jsonl: timestamp in ms, input_length, output_length, hash_ids).

    `time_scale` multiplies arrival times (0.5 = twice the rate); `length_scale` multiplies both
    lengths; the caps clip lengths (e.g. to a small model's context). Lengths stay >= 1. A trace
    without times keeps file order and gets arrival 0 everywhere (see `has_times`); `generate`
    re-times it with an arrival process.
    """
    rows = _mooncake_rows(path) if str(path).endswith((".jsonl", ".json")) else _csv_rows(path)
    out = [RequestSpec(float(t or 0.0) * time_scale, *_scaled(p, o, length_scale, max_prompt_tokens,
                                                              max_output_tokens), h)
           for t, p, o, h in rows]
    if all(t is not None for t, *_ in rows):
        out.sort(key=lambda r: r.arrival_s)
    if out:
        t0 = out[0].arrival_s
        out = [RequestSpec(r.arrival_s - t0, r.prompt_tokens, r.output_tokens, r.hash_ids) for r in out]
    return out


def has_times(path: str | Path) -> bool:
    """Whether a trace file records arrival times (CSV arrived_at, or Mooncake timestamps)."""
    rows = _mooncake_rows(path) if str(path).endswith((".jsonl", ".json")) else _csv_rows(path)
    return bool(rows) and all(t is not None for t, *_ in rows)


def arrival_times(
    num: int, rate: float, arrival: str = "poisson", burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Arrival times of `num` requests at mean `rate` req/s; the first arrives at 0.

    poisson: exponential gaps. gamma: gaps ~ Gamma(shape=1/burstiness, scale=burstiness/rate), so
    the mean rate is unchanged and burstiness > 1 clusters requests (vLLM's --burstiness, inverted).
    rate=inf: everything at t=0.
    """
    if rate <= 0:
        raise ValueError("rate must be > 0 (use inf for all at once)")
    if math.isinf(rate):
        return [0.0] * num
    if arrival not in ("poisson", "gamma"):
        raise ValueError(f"arrival must be 'poisson', 'gamma' or 'trace', got {arrival!r}")
    if burstiness <= 0:
        raise ValueError("burstiness must be > 0")
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(num):
        if i:
            if arrival == "poisson":
                t += rng.expovariate(rate)
            else:
                t += rng.gammavariate(1.0 / burstiness, burstiness / rate)
        out.append(t)
    return out


def generate(
    workload: str | WorkloadSpec,
    num_requests: int,
    rate: float,
    arrival: str = "poisson",
    burstiness: float = 1.0,
    seed: int = 0,
    trace: str | Path | None = None,
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
) -> list[RequestSpec]:
    """`num_requests` requests from a preset (or a trace's lengths) with the chosen arrival process.

    With `trace` and arrival='trace' the trace is replayed as recorded (first `num_requests` rows,
    scaled by `time_scale`); with `trace` and poisson/gamma the trace's lengths are kept in order and
    re-timed at `rate`. Lengths of presets and arrival gaps come from separate seeded streams, so
    changing the rate leaves the lengths unchanged.
    """
    if trace is not None:
        rows = load_trace(trace, time_scale, length_scale, max_prompt_tokens, max_output_tokens)
        if num_requests > 0:
            rows = rows[:num_requests]
        if arrival == "trace":
            if not has_times(trace):
                raise ValueError(f"{trace} has no arrival times: choose an arrival process (poisson or gamma)")
            return rows
        times = arrival_times(len(rows), rate, arrival, burstiness, seed)
        return [RequestSpec(t, r.prompt_tokens, r.output_tokens, r.hash_ids)
                for t, r in zip(times, rows, strict=True)]
    if arrival == "trace":
        raise ValueError("arrival='trace' needs a trace file")
    if isinstance(workload, str) and workload not in PRESETS:
        raise ValueError(f"unknown workload {workload!r}; presets: {', '.join(PRESETS)}")
    spec = PRESETS[workload] if isinstance(workload, str) else workload
    rng = random.Random(seed * 1_000_003 + 17)
    times = arrival_times(num_requests, rate, arrival, burstiness, seed)
    out = []
    for t in times:
        p, o = _scaled(spec.prompt.sample(rng), spec.output.sample(rng), length_scale, max_prompt_tokens,
                       max_output_tokens)
        out.append(RequestSpec(t * time_scale, p, o))
    return out
