"""A day of traffic replayed through the simulator with the online planner in the loop (or a fixed split).

The day is a list of planner intervals, each with its own arrival rate and length mix. Each
interval is represented by a window of requests (`window_s` of its traffic, seeded by the
interval's index, so every policy sees the same requests), simulated by the discrete-event
`Simulator` (`build`, the cluster `pdserve sim` runs) on the split in force. What the window
measured is the planner's `Observation`; its `Decision` is the next interval's split.

A role change costs `switch_s`: the workers that change role (or join) serve nothing for that long
at the start of the next interval (they drain the old role's work, then rejoin), and are paid for;
in the window, that is the same share of it. If the
workers that keep their role cannot form a cluster on their own (no prefill or no decode left),
the switches are staged and the old split serves the drain time. The planner hears when a change
took effect (`SlaPlanner.settled`: the interval's start, plus the drain if workers switched), as
the real one does from serve/planner_loop.py, so its cool-down counts from then.

Simplifications, said where the figures are: each window starts with empty queues (no backlog
carried from the previous interval), and a window stands for its whole interval. GPU-hours are
counts x TP x interval length.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdserve.metrics_summary import SLO
from pdserve.sched.sla_planner import Observation, SlaPlanner, Split
from pdserve.sim.build import GPU_SCALE, SimConfig, build
from pdserve.sim.metrics import attainment, per_request_ms
from pdserve.workload import LengthDist, RequestSpec, arrival_times


@dataclass(frozen=True)
class Interval:
    """One planner interval of the day: its start, mean arrival rate and length mix."""

    start_s: float
    rate: float
    prompt: LengthDist
    output: LengthDist
    phase: str = ""


@dataclass
class IntervalResult:
    start_s: float
    phase: str
    split: Split
    requests: int
    attained: int
    ttft_p90_ms: float
    tpot_p90_ms: float
    switching: int  # workers changing role at this interval's start
    decision: dict[str, Any] | None = None

    @property
    def attainment(self) -> float:
        return self.attained / self.requests if self.requests else 1.0


@dataclass
class Replay:
    name: str
    intervals: list[IntervalResult] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.intervals)

    @property
    def attainment(self) -> float:
        return sum(r.attained for r in self.intervals) / max(1, self.requests)

    def gpu_hours(self, tp: int, interval_s: float) -> float:
        return sum(r.split.total for r in self.intervals) * tp * interval_s / 3600

    def as_dict(self, tp: int, interval_s: float) -> dict[str, Any]:
        return {"name": self.name, "attainment": self.attainment, "requests": self.requests,
                "gpu_hours": self.gpu_hours(tp, interval_s),
                "switches": sum(r.switching for r in self.intervals),
                "intervals": [{"start_h": r.start_s / 3600, "phase": r.phase, "split": r.split.as_dict(),
                               "requests": r.requests, "attainment": r.attainment,
                               "ttft_p90_ms": r.ttft_p90_ms, "tpot_p90_ms": r.tpot_p90_ms,
                               "switching": r.switching, "decision": r.decision} for r in self.intervals]}


def window_specs(iv: Interval, window_s: float, seed: int) -> list[RequestSpec]:
    """The interval's window: Poisson arrivals at its rate, lengths from its mix."""
    n = max(1, int(round(iv.rate * window_s)))
    rng = random.Random(seed)
    times = arrival_times(n, iv.rate, seed=seed)
    return [RequestSpec(t, iv.prompt.sample(rng), iv.output.sample(rng)) for t in times]


def _p90(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(np.percentile(x, 90)) if x.size else math.nan


@dataclass
class ElasticSim:
    """Replays intervals on `model` with `tp` x `gpu` instances."""

    model: str
    slo: SLO
    gpu: str = "h100"
    tp: int = 4
    link: str = "cx7-400g"
    interval_s: float = 1800.0
    window_s: float = 60.0
    switch_s: float = 30.0
    serving: dict[str, Any] = field(default_factory=lambda: GPU_SCALE)

    def _config(self, split: Split) -> SimConfig:
        if split.mode == "colocated":
            return SimConfig.of(model=self.model, mode="colocated", num_colocated=split.colocated,
                                serving=self.serving, prefill_gpu=self.gpu, tp_prefill=self.tp, link=self.link)
        return SimConfig.of(model=self.model, mode="disagg", num_prefill=split.prefill, num_decode=split.decode,
                            serving=self.serving, prefill_gpu=self.gpu, decode_gpu=self.gpu,
                            tp_prefill=self.tp, tp_decode=self.tp, link=self.link)

    def simulate(self, split: Split, specs: list[RequestSpec]) -> dict[str, np.ndarray]:
        """Per request: ttft and tpot (ms) and whether it met the SLO, on `split`."""
        if not specs:
            return {"ttft": np.zeros(0), "tpot": np.zeros(0), "ok": np.zeros(0, bool)}
        t0 = specs[0].arrival_s
        shifted = [RequestSpec(s.arrival_s - t0, s.prompt_tokens, s.output_tokens) for s in specs]
        r = build(self._config(split)).run(shifted)
        m = per_request_ms(r)
        return {"ttft": m["ttft"], "tpot": m["tpot"], "ok": attainment(r, self.slo)}

    def _window(self, old: Split, new: Split, specs: list[RequestSpec]) -> tuple[dict[str, np.ndarray], int]:
        """Simulate one window on `new`, the first switch_s on the workers that keep their role."""
        switching = sum(max(0, getattr(new, r) - getattr(old, r)) for r in ("prefill", "decode", "colocated"))
        if switching == 0 or self.switch_s <= 0:
            return self.simulate(new, specs), 0
        stay = Split(min(old.prefill, new.prefill), min(old.decode, new.decode), min(old.colocated, new.colocated))
        valid = stay.total > 0 and stay.mode != "mixed" and (stay.mode == "colocated" or (stay.prefill and stay.decode))
        during = stay if valid else old
        # the drain's share of the interval, in the window that stands for it
        drain = self.window_s * min(1.0, self.switch_s / self.interval_s)
        cut = next((i for i, s in enumerate(specs) if s.arrival_s >= specs[0].arrival_s + drain), len(specs))
        a, b = self.simulate(during, specs[:cut]), self.simulate(new, specs[cut:])
        return {k: np.concatenate([a[k], b[k]]) for k in a}, switching

    def replay(self, day: list[Interval], name: str, fixed: Split | None = None,
               planner: SlaPlanner | None = None, start: Split | None = None,
               progress: Callable[[str], None] | None = None) -> Replay:
        """Replay `day` on a fixed split, or with `planner` deciding each next interval's split."""
        assert (fixed is None) != (planner is None), "give a fixed split or a planner"
        split = fixed or start or Split(1, 1)
        prev = split
        out = Replay(name)
        for k, iv in enumerate(day):
            specs = window_specs(iv, self.window_s, seed=1000 + k)
            m, switching = self._window(prev, split, specs)
            if planner is not None and split != prev:
                # the change took effect once its workers were done switching: the cool-down counts
                # from then, as serve/planner_loop.py tells the real planner after acting
                planner.settled(iv.start_s + (min(self.switch_s, self.interval_s) if switching else 0.0))
            res = IntervalResult(iv.start_s, iv.phase, split, len(specs), int(m["ok"].sum()),
                                 _p90(m["ttft"]), _p90(m["tpot"]), switching)
            prev = split
            if planner is not None:
                d = planner.observe(self.observation(iv, k, specs, m, split))
                res.decision = {"wanted": d.wanted.as_dict(), "changed": d.changed, "reason": d.reason,
                                "predicted_rate": d.predicted.rate, "corrections": d.corrections}
                split = d.wanted
            out.intervals.append(res)
            if progress is not None:
                progress(f"{name} {iv.start_s / 3600:5.1f} h {iv.phase:<6} {res.split!s:>8} "
                         f"{iv.rate:6.2f} req/s attainment {res.attainment:6.1%}")
        return out

    def observation(self, iv: Interval, k: int, specs: list[RequestSpec], m: dict[str, np.ndarray],
                    split: Split) -> Observation:
        """What the router would have measured over the interval (the window scaled to it)."""
        n = len(specs)
        p90 = (lambda x: None if math.isnan(_p90(x)) else _p90(x) / 1e3)  # noqa: E731
        return Observation(time_s=iv.start_s + self.interval_s, interval_s=self.interval_s,
                           requests=round(n * self.interval_s / self.window_s),
                           prompt_tokens=float(np.mean([s.prompt_tokens for s in specs])),
                           output_tokens=float(np.mean([s.output_tokens for s in specs])),
                           ttft_s=p90(m["ttft"]), tpot_s=p90(m["tpot"]), counts=split.as_dict())


CHAT = (LengthDist("lognormal", 16, 4096, median=300, sigma=0.8), LengthDist("lognormal", 16, 2048, median=500, sigma=0.6))
LONG = (LengthDist("lognormal", 512, 16384, median=4000, sigma=0.5),
        LengthDist("lognormal", 8, 1024, median=120, sigma=0.6))


def shifting_day(peak_chat: float, peak_long: float, hours: int = 24, long_from: float = 8.0,
                 long_to: float = 14.0) -> list[Interval]:
    """A day in `hours` intervals: the rate follows a daily curve (lowest at 03:00, highest at
    15:00, a fifth of the peak at night); chat traffic (short prompts, long answers) except from
    `long_from` to `long_to` o'clock, when long prompts with short answers (RAG, summaries) take
    over, at their own peak rate."""
    out = []
    step = 24.0 / hours
    for k in range(hours):
        h = k * step
        shape = 0.2 + 0.8 * (0.5 - 0.5 * math.cos(2 * math.pi * (h - 3) / 24))
        long = long_from <= h < long_to
        prompt, output = LONG if long else CHAT
        out.append(Interval(h * 3600, shape * (peak_long if long else peak_chat), prompt, output,
                            "long" if long else "chat"))
    return out
