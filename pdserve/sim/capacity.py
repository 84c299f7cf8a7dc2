"""One instance's capacity at an SLO, from a step-time model: what the online planner plans with.

The same arithmetic as the capacity planner's (`sim/planner.py`: `prefill_capacity`,
`decode_capacity`; equal to them with no SLO and no KV limit, tested), over any `StepTimeModel`
(the roofline, or a profile measured with `pdserve profile`), extended with what an online
decision needs: the TTFT a prefill pool has at a utilization (batches served as an M/D/1 queue),
the KV memory bound on the decode batch, and the colocated (chunked-prefill) instance, whose every
step carries a prefill chunk beside its decodes, so long prompts slow its TPOT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.sim.perf_model import StepTimeModel

BATCHES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # decode_capacity's ladder (sim/planner.py)


def _queue_factor(rho: float) -> float:
    """Mean time in an M/D/1 system over its service time."""
    rho = min(rho, 0.999)
    return 1 + rho / (2 * (1 - rho))


def _max_rho(slo_over_service: float) -> float:
    """Largest utilization whose _queue_factor stays within slo / service."""
    x = slo_over_service - 1
    return 0.0 if x <= 0 else 2 * x / (1 + 2 * x)


@dataclass
class StepCapacity:
    """`CapacityModel` (sched/sla_planner.py) over a step-time model.

    batch_tokens / max_seqs / chunk_tokens: the prefill batch budget, the decode batch cap and the
    colocated step budget (the schema's prefill.max_batch_tokens, decode.max_batch_size,
    colocated.max_num_batched_tokens). kv_tokens: KV tokens one decode or colocated instance holds
    (None: unbounded, as `decode_capacity`)."""

    step: StepTimeModel
    batch_tokens: int = 8192
    max_seqs: int = 256
    chunk_tokens: int = 2048
    kv_tokens: int | None = None

    def _kv_cap(self, prompt: float, output: float) -> int:
        if self.kv_tokens is None:
            return self.max_seqs
        return max(1, min(self.max_seqs, int(self.kv_tokens // (prompt + output))))

    # ---- prefill
    def _prefill_batch(self, prompt: float, k: int) -> float:
        return self.step.prefill_time([int(prompt)] * k)

    def prefill_rate(self, prompt: float, ttft_s: float = math.inf) -> float:
        full = max(1, int(self.batch_tokens // max(1.0, prompt)))
        best = 0.0
        for k in sorted({min(full, b) for b in BATCHES} | {full}):
            t = self._prefill_batch(prompt, k)
            rho = 1.0 if math.isinf(ttft_s) else _max_rho(ttft_s / t)
            best = max(best, rho * k / t)
        return best

    # ---- decode
    def decode_rate(self, prompt: float, output: float, tpot_s: float = math.inf) -> float:
        ctx = int(prompt + output / 2)
        cap = self._kv_cap(prompt, output)
        best = 0.0
        for b in DECODE_BATCHES:
            if b > cap:
                break
            t = self.step.decode_time([ctx] * b)
            if t > tpot_s and b > 1:
                break
            best = b / t / output
        return best

    # ---- colocated
    def _colocated(self, prompt: float, output: float, b: int) -> tuple[float, float, float, float]:
        """With b sequences decoding: (rate, mean step = TPOT, step with a prefill chunk, share of
        steps with one). The scheduler packs queued prompt tokens up to its budget, so prefill comes
        in lumps (a whole prompt, or a budget-sized chunk of one), not spread thinly over steps:
        a step either carries a chunk (t_full) or not (t_dec). Rate from Little's law,
        b = rate * output * mean step, the mean step being t_dec / (1 - rate * prompt * (t_full - t_dec) / chunk)."""
        ctx = [int(prompt + output / 2)] * b
        chunk = max(1.0, min(float(self.chunk_tokens - b), prompt))
        t_dec = self.step.decode_time(ctx)
        t_full = self.step.mixed_time([(int(chunk), int(max(0.0, prompt - chunk) / 2))], ctx)
        k = prompt * (t_full - t_dec) / chunk
        rate = b / (output * t_dec + b * k)
        step = b / (rate * output)
        return rate, step, t_full, rate * prompt * step / chunk

    def _colocated_ttft(self, prompt: float, b: int, t_full: float, share: float) -> float:
        chunk = max(1.0, min(float(self.chunk_tokens - b), prompt))
        return math.ceil(prompt / chunk) * t_full * _queue_factor(share)

    def colocated_rate(self, prompt: float, output: float, ttft_s: float = math.inf,
                       tpot_s: float = math.inf) -> float:
        cap = min(self._kv_cap(prompt, output), self.chunk_tokens - 1)
        best = 0.0
        for b in BATCHES:
            if b > cap:
                break
            rate, step, t_full, share = self._colocated(prompt, output, b)
            if step > tpot_s and b > 1:
                break
            if step <= tpot_s and self._colocated_ttft(prompt, b, t_full, share) <= ttft_s:
                best = max(best, rate)
        return best

    # ---- latency at a load (for the correction factors)
    def expected(self, mode: str, prompt: float, output: float, rate_per_instance: float
                 ) -> tuple[float, float]:
        lam = max(0.0, rate_per_instance)
        if mode == "colocated":
            cap = min(self._kv_cap(prompt, output), self.chunk_tokens - 1)
            pts = [(b, *self._colocated(prompt, output, b)) for b in BATCHES if b <= cap]
            b, _, step, t_full, share = pts[0]
            for b_, rate_, step_, t_full_, share_ in pts:  # the smallest batch that carries the load
                b, step, t_full, share = b_, step_, t_full_, share_
                if rate_ >= lam:
                    break
            return self._colocated_ttft(prompt, b, t_full, share), step
        full = max(1, int(self.batch_tokens // max(1.0, prompt)))
        mu = self.prefill_rate(prompt)
        t_full = self._prefill_batch(prompt, full)
        k = min(full, max(1, int(round(lam * t_full))))
        ttft = self._prefill_batch(prompt, k) * _queue_factor(lam / mu if mu > 0 else 1.0)
        ctx = int(prompt + output / 2)
        b = 1.0
        for _ in range(30):
            t = self.step.decode_time([ctx] * max(1, int(round(b))))
            b = min(float(self._kv_cap(prompt, output)), max(1.0, lam * output * t))
        return ttft, self.step.decode_time([ctx] * max(1, int(round(b))))


def roofline_capacity(model: str, gpu: str = "h100", tp: int = 0, **kw: int) -> StepCapacity:
    """StepCapacity of the roofline for `model` on `tp` x `gpu` (0: the smallest TP that fits),
    with that instance's KV capacity."""
    from pdserve.config.model import resolve_shape
    from pdserve.sim.hardware import get_gpu
    from pdserve.sim.perf_model import RooflineModel, kv_capacity_tokens, min_tp

    shape, g = resolve_shape(model), get_gpu(gpu)
    tp = tp or min_tp(shape, g) or 1
    return StepCapacity(RooflineModel(shape, g, tp), kv_tokens=kv_capacity_tokens(shape, g, tp), **kw)


def for_cluster(cfg) -> StepCapacity:  # type: ignore[no-untyped-def]
    """The online planner's model of a `ClusterConfig`'s workers: its `planner.profile` (measured with
    `pdserve profile`), else the roofline of its model on `planner.gpu`; the batch budgets are the
    cluster's own."""
    kw = {"batch_tokens": cfg.prefill.max_batch_tokens, "max_seqs": cfg.decode.max_batch_size,
          "chunk_tokens": cfg.colocated.max_num_batched_tokens}
    if cfg.planner.profile:
        from pdserve.sim.profile import ProfiledModel

        kv = cfg.cache.num_blocks * cfg.cache.block_size or None
        return StepCapacity(ProfiledModel.load(cfg.planner.profile), kv_tokens=kv, **kw)
    return roofline_capacity(cfg.model, cfg.planner.gpu, cfg.planner.tp, **kw)
