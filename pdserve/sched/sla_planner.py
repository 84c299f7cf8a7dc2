"""The online SLA planner's decision: from one interval's measurements to the wanted P:D split.

Every interval (Dynamo's SLA planner, adapted):
  1. correction factors: observed p90 TTFT / TPOT over what the performance model expects at the
     load the cluster carried (a measured cluster is slower than its model by queueing bursts,
     serving overheads, transfer; faster by prefix-cache hits). Kept per mode, smoothed, clamped;
  2. predict the next interval's arrival rate (`constant`, or `holt`: double exponential
     smoothing, which follows a ramp instead of lagging it); the mean prompt and output lengths
     are the last interval's (a mix shifts in steps, where a trend overshoots);
  3. per mode, instances needed: prefill = rate / (one instance's rate at TTFT SLO / correction),
     decode likewise at the TPOT SLO, colocated = rate / (its rate at both); the correction divides
     the SLO the model is asked about, as Dynamo's corrected ITL does;
     no instance is planned above `max_utilization` of its saturated rate (bursts, length spread);
     a correction applies to the mix it was learned on (lengths within `mix_tolerance`);
  4. the cheaper mode wins (all colocated when it needs fewer instances), within min/max per role
     and the worker limit; with a fixed number of workers (role switches only) the split that
     leaves the most headroom on its tightest role wins;
  5. hysteresis (a change must beat what runs by `hysteresis`, and scale-down only once the need
     is `hysteresis` below the count) and a cool-down (no scale-down, mode flip or switch within
     `cooldown_s` of the last change taking effect, `settled`; scale-up is never delayed).
The current counts come from each observation, never from the planner's memory, so a worker
added, removed or switched by hand is simply the new starting point.
Pure: no I/O, no clock; time is the observation's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.sched.load_predictors import ConstantPredictor, HoltPredictor, make_predictor

ROLES = ("prefill", "decode", "colocated")
OVERLOAD = 0.95  # load over the model's saturated rate beyond which no correction factor is learned


@dataclass(frozen=True)
class Observation:
    """What the router measured over one interval ending at `time_s`."""

    time_s: float
    interval_s: float
    requests: int  # finished in the interval (the arrival-rate estimate)
    prompt_tokens: float = 0.0  # mean over those requests
    output_tokens: float = 0.0
    ttft_s: float | None = None  # p90 (None: no request)
    tpot_s: float | None = None
    counts: dict[str, int] = field(default_factory=dict)  # workers per role now
    queued: dict[str, float] = field(default_factory=dict)  # requests waiting per role
    busy: dict[str, float] = field(default_factory=dict)  # mean busy fraction per role
    kv_usage: float = 0.0  # share of KV blocks in use (decode and colocated workers)

    @property
    def rate(self) -> float:
        return self.requests / self.interval_s if self.interval_s > 0 else 0.0


@dataclass(frozen=True)
class Split:
    """Workers per role."""

    prefill: int = 0
    decode: int = 0
    colocated: int = 0

    @classmethod
    def of(cls, counts: dict[str, int]) -> Split:
        return cls(*(int(counts.get(r, 0)) for r in ROLES))

    @property
    def total(self) -> int:
        return self.prefill + self.decode + self.colocated

    @property
    def mode(self) -> str:
        if self.colocated and (self.prefill or self.decode):
            return "mixed"
        return "colocated" if self.colocated else "disagg"

    def as_dict(self) -> dict[str, int]:
        return {r: getattr(self, r) for r in ROLES}

    def __str__(self) -> str:
        if self.mode == "colocated":
            return f"{self.colocated}C"
        return f"{self.prefill}P{self.decode}D" + (f"+{self.colocated}C" if self.colocated else "")


class CapacityModel(Protocol):
    """One instance's sustainable request rate and expected latencies, from the performance model
    (`pdserve.sim.capacity.StepCapacity` over the roofline or a measured profile)."""

    def prefill_rate(self, prompt: float, ttft_s: float) -> float:
        """Requests/s one prefill instance takes with p90-ish TTFT within `ttft_s`."""

    def decode_rate(self, prompt: float, output: float, tpot_s: float) -> float:
        """Requests/s one decode instance takes with its step time within `tpot_s`."""

    def colocated_rate(self, prompt: float, output: float, ttft_s: float, tpot_s: float) -> float:
        """Requests/s one colocated (chunked-prefill) instance takes within both."""

    def expected(self, mode: str, prompt: float, output: float, rate_per_instance: float
                 ) -> tuple[float, float]:
        """(TTFT, TPOT) seconds the model expects at this load; mode 'prefill'/'decode' pools of a
        disaggregated cluster are both given by 'disagg'."""

    # (the rates with math.inf SLOs are the saturated rates)


# ---- the planner -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannerSettings:
    """The planner's knobs (the schema's `planner` section, in seconds)."""

    slo_ttft_s: float
    slo_tpot_s: float
    predictor: str = "holt"
    modes: str = "auto"  # auto | disagg | colocated
    min_workers: dict[str, int] = field(default_factory=dict)  # per role, when the role is used
    max_workers: dict[str, int] = field(default_factory=dict)
    max_total: int = 0  # 0: the workers observed (switch roles only, add none)
    elastic: bool = False  # may add and remove workers (needs a launcher)
    cooldown_s: float = 120.0
    hysteresis: float = 0.15
    max_utilization: float = 0.8  # of an instance's saturated rate, whatever the SLO allows
    correction_smoothing: float = 0.5  # weight of the newest correction factor
    correction_bounds: tuple[float, float] = (0.5, 4.0)
    mix_tolerance: float = 2.0  # corrections learned on a mix apply while lengths stay within this factor


@dataclass(frozen=True)
class Load:
    rate: float
    prompt: float
    output: float


@dataclass(frozen=True)
class Decision:
    """One interval's outcome, with everything it was decided from."""

    time_s: float
    current: Split
    wanted: Split
    changed: bool
    reason: str
    predicted: Load
    need: dict[str, float]  # fractional instances per role the model asks for, per mode
    corrections: dict[str, float]
    observation: Observation

    def as_dict(self) -> dict[str, object]:
        o = self.observation
        return {"time_s": self.time_s, "current": self.current.as_dict(), "wanted": self.wanted.as_dict(),
                "changed": self.changed, "reason": self.reason, "predicted": vars(self.predicted),
                "need": self.need, "corrections": self.corrections,
                "observed": {"rate": o.rate, "prompt": o.prompt_tokens, "output": o.output_tokens,
                             "ttft_s": o.ttft_s, "tpot_s": o.tpot_s, "queued": o.queued, "busy": o.busy,
                             "kv_usage": o.kv_usage}}


class SlaPlanner:
    """Decides the split each interval; feed it one Observation per interval, in time order."""

    def __init__(self, capacity: CapacityModel, settings: PlannerSettings) -> None:
        self.capacity = capacity
        self.s = settings
        self.rate = make_predictor(settings.predictor)
        self.prompt = ConstantPredictor()
        self.output = ConstantPredictor()
        # ttft_disagg, tpot_disagg, ttft_colocated, tpot_colocated
        self.corrections = {f"{k}_{m}": 1.0 for m in ("disagg", "colocated") for k in ("ttft", "tpot")}
        self.learned_on: dict[str, tuple[float, float]] = {}  # mode -> (prompt, output) its corrections saw
        self.last_change_s: float | None = None

    # ---- 1. corrections
    def _correct(self, o: Observation, cur: Split) -> None:
        mode = cur.mode
        if mode == "mixed" or o.requests == 0 or o.prompt_tokens <= 0:
            return  # mid-switch or idle: nothing to learn from
        per = o.rate / max(1, cur.prefill if mode == "disagg" else cur.colocated)
        per_d = o.rate / max(1, cur.decode) if mode == "disagg" else per
        cap = self.capacity
        p, out = o.prompt_tokens, max(1.0, o.output_tokens)
        inf = math.inf
        sat = [(per, cap.colocated_rate(p, out, inf, inf))] if mode == "colocated" else \
              [(per, cap.prefill_rate(p, inf)), (per_d, cap.decode_rate(p, out, inf))]
        if not all(x < OVERLOAD * r for x, r in sat):
            return  # past saturation the model expects no finite latency: nothing to calibrate against
        ttft_e, _ = self.capacity.expected(mode, o.prompt_tokens, o.output_tokens, per)
        _, tpot_e = self.capacity.expected(mode, o.prompt_tokens, o.output_tokens, per_d)
        lo, hi = self.s.correction_bounds
        w = self.s.correction_smoothing
        if not self._same_mix(mode, p, out):
            w = 1.0  # a new mix: start from what it shows, not from the last mix's factor
        self.learned_on[mode] = (p, out)
        for key, seen, want in (("ttft", o.ttft_s, ttft_e), ("tpot", o.tpot_s, tpot_e)):
            if seen is None or not want > 0 or not math.isfinite(want):
                continue
            k = f"{key}_{mode}"
            self.corrections[k] = min(hi, max(lo, w * seen / want + (1 - w) * self.corrections[k]))

    def _same_mix(self, mode: str, prompt: float, output: float) -> bool:
        seen = self.learned_on.get(mode)
        tol = self.s.mix_tolerance
        return seen is not None and all(1 / tol <= a / b <= tol for a, b in zip((prompt, output), seen, strict=True))

    def correction(self, key: str, mode: str, load: Load) -> float:
        """The factor for `key` ('ttft'/'tpot') in `mode`, if it was learned on a mix like `load`'s."""
        return self.corrections[f"{key}_{mode}"] if self._same_mix(mode, load.prompt, load.output) else 1.0

    # ---- 3. need per mode
    def need(self, load: Load) -> dict[str, float]:
        """Fractional instances per role: prefill and decode (disaggregated) and colocated."""
        s, cap, u, inf = self.s, self.capacity, self.s.max_utilization, math.inf
        p, o = max(1.0, load.prompt), max(1.0, load.output)
        c = {f"{k}_{m}": self.correction(k, m, load) for k in ("ttft", "tpot") for m in ("disagg", "colocated")}
        pr = _rate(cap.prefill_rate(p, s.slo_ttft_s / c["ttft_disagg"]), u * cap.prefill_rate(p, inf))
        dr = _rate(cap.decode_rate(p, o, s.slo_tpot_s / c["tpot_disagg"]), u * cap.decode_rate(p, o, inf))
        cr = _rate(cap.colocated_rate(p, o, s.slo_ttft_s / c["ttft_colocated"], s.slo_tpot_s / c["tpot_colocated"]),
                   u * cap.colocated_rate(p, o, inf, inf))
        return {"prefill": load.rate / pr if pr > 0 else math.inf,
                "decode": load.rate / dr if dr > 0 else math.inf,
                "colocated": load.rate / cr if cr > 0 else math.inf}

    def _bounded(self, role: str, n: int) -> int:
        lo = max(1, self.s.min_workers.get(role, 0))
        hi = self.s.max_workers.get(role, 0) or 10**9
        return min(hi, max(lo, n))

    def _elastic(self, need: dict[str, float], cur: Split, limit: int) -> dict[str, Split]:
        """Per mode, the counts that meet the need, with scale-down hysteresis against `cur`."""
        h = self.s.hysteresis

        def count(role: str, now: int) -> int:
            x = need[role]
            if not math.isfinite(x):
                return self._bounded(role, 10**9)
            up = math.ceil(x - 1e-9)
            if up > now:
                return self._bounded(role, up)
            keep_down = math.ceil(x * (1 + h) - 1e-9)  # shrink only below need * (1 + h)
            return self._bounded(role, min(now, keep_down) if now else up)

        dis = Split(count("prefill", cur.prefill), count("decode", cur.decode))
        if dis.total > limit:  # too few workers: share them by need
            dis = self._share(need, limit)
        col = Split(colocated=min(limit, count("colocated", cur.colocated)))
        return {"disagg": dis, "colocated": col}

    def _share(self, need: dict[str, float], n: int) -> Split:
        """n workers split between prefill and decode by need (each at least its minimum)."""
        tot = need["prefill"] + need["decode"]
        share = 0.5 if not math.isfinite(tot) or tot <= 0 else need["prefill"] / tot
        lo_p, lo_d = self._bounded("prefill", 1), self._bounded("decode", 1)
        p = min(max(lo_p, round(n * share)), max(lo_p, n - lo_d))
        p = min(p, self._bounded("prefill", p))
        d = self._bounded("decode", n - p)
        return Split(p, d)

    def _fixed(self, need: dict[str, float], n: int) -> dict[str, Split]:
        return {"disagg": self._share(need, n) if n >= 2 else Split(),
                "colocated": Split(colocated=self._bounded("colocated", n))}

    @staticmethod
    def pressure(split: Split, need: dict[str, float]) -> float:
        """Need over count on the tightest role (above 1: the SLOs will be missed)."""
        roles = ("colocated",) if split.mode == "colocated" else ("prefill", "decode")
        return max((need[r] / getattr(split, r) if getattr(split, r) else math.inf) for r in roles)

    # ---- the interval
    def observe(self, o: Observation) -> Decision:
        cur = Split.of(o.counts)
        self._correct(o, cur)
        self.rate.update(o.rate)
        if o.requests:  # lengths: the last interval's (a mix changes in steps; a trend would overshoot)
            self.prompt.update(o.prompt_tokens)
            self.output.update(o.output_tokens)
        load = Load(self.rate.predict(), self.prompt.predict(), self.output.predict())
        need = self.need(load)
        s = self.s
        limit = s.max_total if s.elastic and s.max_total else cur.total
        options = self._elastic(need, cur, limit) if s.elastic else self._fixed(need, cur.total)
        if s.modes != "auto":
            options = {s.modes: options[s.modes]}
        elif any(s.min_workers.get(r, 0) for r in ("prefill", "decode")):
            options.pop("colocated")  # a minimum on prefill or decode keeps the cluster disaggregated
        elif s.min_workers.get("colocated", 0):
            options.pop("disagg")
        options = {m: x for m, x in options.items() if x.total > 0}
        wanted, why = self._choose(options, cur, need, load)
        cooling = self.last_change_s is not None and o.time_s - self.last_change_s < s.cooldown_s
        grows_only = wanted.mode == cur.mode and all(getattr(wanted, r) >= getattr(cur, r) for r in ROLES)
        if wanted != cur and cooling and not grows_only:
            why = f"cool-down ({o.time_s - self.last_change_s:.0f} s of {s.cooldown_s:.0f} s since the last " \
                  f"change) holds {cur} instead of {wanted}: {why}"
            wanted = cur
        changed = wanted != cur
        if changed:
            self.last_change_s = o.time_s
        return Decision(o.time_s, cur, wanted, changed, why, load, need, dict(self.corrections), o)

    def settled(self, time_s: float) -> None:
        """The last change took effect at `time_s` (its workers started, switched or stopped): the
        cool-down counts from then, so a change slower than the cool-down (a worker loading its
        weights for minutes) is not undone by the first interval after it lands."""
        if self.last_change_s is not None:
            self.last_change_s = max(self.last_change_s, time_s)

    def _choose(self, options: dict[str, Split], cur: Split, need: dict[str, float], load: Load
                ) -> tuple[Split, str]:
        h = self.s.hysteresis
        tag = f"predicted {load.rate:.2f} req/s, prompt {load.prompt:.0f}, output {load.output:.0f} tok; " \
              f"need {need['prefill']:.2f}P {need['decode']:.2f}D or {need['colocated']:.2f}C"
        if not options:
            return cur, f"no allowed split; keep {cur} ({tag})"
        if self.s.elastic:
            # cheapest total; a mode flip must save more than the hysteresis band
            best = min(options.values(), key=lambda x: (x.total, x.mode != cur.mode))
            same = options.get(cur.mode)
            if same is not None and best.mode != cur.mode and best.total > same.total * (1 - h):
                best = same
            if best == cur:
                return cur, f"keep {cur}: {tag}"
            return best, f"{cur} -> {best}: {tag}"
        # fixed workers: the split with the most headroom on its tightest role
        best = min(options.values(), key=lambda x: (self.pressure(x, need), x.mode != cur.mode))
        now = self.pressure(cur, need) if cur.mode != "mixed" else math.inf
        if best == cur or not self.pressure(best, need) < now * (1 - h):
            return cur, f"keep {cur} (pressure {now:.2f}; best {best} {self.pressure(best, need):.2f}): {tag}"
        return best, f"{cur} -> {best} (pressure {now:.2f} -> {self.pressure(best, need):.2f}): {tag}"


def _rate(at_slo: float, capped: float) -> float:
    """An instance's planned rate: within the SLO and the utilization cap; where no load meets the
    SLO (a prompt that alone takes longer than the TTFT target), the capped rate: plan for
    throughput rather than give up."""
    return min(at_slo, capped) if at_slo > 0 else capped


def settings_from(section: object, max_total: int = 0, elastic: bool = False) -> PlannerSettings:
    """PlannerSettings from the schema's `planner` section (duck-typed: sched imports no schema)."""
    g = section.__getattribute__
    return PlannerSettings(
        slo_ttft_s=g("slo_ttft_ms") / 1e3, slo_tpot_s=g("slo_tpot_ms") / 1e3, predictor=g("predictor"),
        modes=g("modes"), cooldown_s=g("cooldown_s"), hysteresis=g("hysteresis"),
        max_utilization=g("max_utilization"),
        min_workers={r: g(f"min_{r}") for r in ROLES}, max_workers={r: g(f"max_{r}") for r in ROLES},
        max_total=max_total or g("max_workers"), elastic=elastic and g("elastic"))


__all__ = ["ROLES", "CapacityModel", "ConstantPredictor", "Decision", "HoltPredictor", "Load", "Observation",
           "PlannerSettings", "SlaPlanner", "Split", "make_predictor", "settings_from"]
