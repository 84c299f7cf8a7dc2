"""How much longer a served step with prefill work takes than the profile says, alone and co-running.

Measured on recorded `pdserve bench compare` runs, never fitted to their goodput. Every request
record carries the engine's own timing of its prompt's step (`timings["prefill"]`: first scheduled
to first token, inside the worker) and the client's time of every token. From the token times:
  - the step's batch: requests with a token at the prompt's first-token time (within TOL_S) that
    had one at the end of the step before (decodes, context = prompt + tokens so far), and requests
    whose first token came then (prompts prefilled in the same step);
  - co-running: another request streamed >= 2 tokens during the step (a request not in this
    batch, so another worker of the host was computing meanwhile).
Per request, the factor f with  real = decodes' own step + f * (the rest of the modelled step)
(`ProfiledModel.prefill_share`); the median per class is the profile's "prefill_factor" /
"corun_prefill_factor" for the mode (`pdserve/sim/profile.py`). A step whose tokens overflow the
token budget is left out (its prompt may have been chunked over several steps).
The decode one, "corun_decode_factor", from the decode-only steps (`decode_samples`): a step is a
token time shared by every request decoding in it (each had its previous token at the step
before, within TOL_S, and none had its first token then: no prompt in the step), its batch those
requests (context = prompt + tokens so far); its time over the profile's decode step for that
batch, split by whether another request's prompt step (the engine's `timings["prefill"]` before
its first token) covered at least half of it (co-running) or none of it (alone). The factor is
the median co-running ratio over the median alone one: the slowdown relative to a step with no
peer prefilling, whatever the machine's speed that day (the step overhead covers that).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pdserve.config.load import cluster_from_dict
from pdserve.sim.profile import (  # calibrate's FACTOR_KEYS too (bench may not import sim)
    FACTOR_KEYS,
    ProfiledModel,
)

TOL_S = 0.003  # client-side spread of one step's tokens (loopback SSE); two workers' steps rarely meet this close
STEP_GAP_S = 0.01  # a batch member's token before this step came as it started (the last step's end)
MIN_SAMPLES = 5  # fewer co-running steps than this: no co-running factor (the alone one stands)


def token_times(requests: list[dict[str, Any]]) -> dict[int, tuple[dict[str, Any], np.ndarray]]:
    """Per successful request: its record and its tokens' times since the client's start."""
    out = {}
    for r in requests:
        if not r.get("success") or r.get("ttft_s") is None:
            continue
        sent = r["arrival_s"] + r.get("lag_s", 0.0)
        out[r["index"]] = (r, sent + r["ttft_s"] + np.concatenate([[0.0], np.cumsum(r["itl_s"])]))
    return out


def step_samples(requests: list[dict[str, Any]], model: ProfiledModel, budget: int,
                 colocated: bool) -> list[tuple[float, bool]]:
    """(factor, co-running) for every request whose prompt's step can be read off the records."""
    tl = token_times(requests)
    out: list[tuple[float, bool]] = []
    for i, (r, t) in tl.items():
        real = (r.get("timings") or {}).get("prefill")
        if real is None or real <= 0:
            continue
        end, start = t[0], t[0] - real
        prompts, decodes, corun = [r["prompt_tokens"]], [], False
        for o, (ro, to) in tl.items():
            if o == i:
                continue
            hit = np.flatnonzero(np.abs(to - end) < TOL_S)
            if hit.size:
                k = int(hit[0])
                if k == 0:
                    prompts.append(ro["prompt_tokens"])
                    continue
                if colocated and abs(to[k - 1] - start) < STEP_GAP_S:  # decoding in this worker's steps
                    decodes.append(ro["prompt_tokens"] + k)
                    continue
            if np.count_nonzero((to > start) & (to < end)) >= 2:
                corun = True
        if sum(prompts) + len(decodes) > budget:
            continue
        alone, rest = model.prefill_share([(n, 0) for n in prompts], decodes)
        if rest > 0:
            out.append(((real - alone) / rest, corun))
    return out


CORUN_COVER = 0.5  # a decode step co-runs when another worker's prompt step covers this share of it


def decode_samples(requests: list[dict[str, Any]], model: ProfiledModel) -> list[tuple[float, bool]]:
    """(real step / profile step, co-running) for every decode-only step read off the records
    (module doc); steps touched by a prompt step without being mostly under one are left out."""
    tl = token_times(requests)
    prompts = [(t[0] - r["timings"]["prefill"], t[0]) for r, t in tl.values()
               if (r.get("timings") or {}).get("prefill")]
    firsts = np.sort(np.array([t[0] for _, t in tl.values()]))
    tokens = sorted((float(t[k]), float(t[k - 1]), r["prompt_tokens"] + k)  # (end, start, context)
                    for r, t in tl.values() for k in range(2, len(t)))  # the first decode gap holds the hand-over
    steps: list[list[tuple[float, float, int]]] = []
    for tok in tokens:  # one step: token times within TOL_S of each other
        if steps and tok[0] - steps[-1][-1][0] < TOL_S:
            steps[-1].append(tok)
        else:
            steps.append([tok])
    out: list[tuple[float, bool]] = []
    for members in steps:
        end = float(np.median([e for e, _, _ in members]))
        start = float(np.median([s for _, s, _ in members]))
        if any(abs(s - start) > TOL_S for _, s, _ in members) or end - start <= 0:
            continue  # not one step of one worker
        j = int(np.searchsorted(firsts, end - TOL_S))
        if j < len(firsts) and firsts[j] < end + TOL_S:
            continue  # a prompt's first token in this step: a mixed step
        cover = max((min(end, b) - max(start, a) for a, b in prompts), default=0.0) / (end - start)
        if 0 < cover < CORUN_COVER:
            continue
        out.append(((end - start) / model.decode_time([c for _, _, c in members]), cover >= CORUN_COVER))
    return out


def factors_of(runs: list[list[dict[str, Any]]], model: ProfiledModel, budget: int, colocated: bool) -> dict[str, Any]:
    """One mode's three factors (module doc) over the request records of its runs, with the
    sample counts behind them. budget: the token budget of the worker that prefills."""
    samples = [s for reqs in runs for s in step_samples(reqs, model, budget, colocated)]
    alone = [f for f, c in samples if not c]
    both = [f for f, c in samples if c]
    fa = float(np.median(alone)) if alone else 1.0
    fc = float(np.median(both)) if len(both) >= MIN_SAMPLES else fa
    dec = [s for reqs in runs for s in decode_samples(reqs, model)]
    d_alone = [f for f, c in dec if not c]
    d_both = [f for f, c in dec if c]
    fd = float(np.median(d_both) / np.median(d_alone)) if len(d_both) >= MIN_SAMPLES and d_alone else 1.0
    return {**dict(zip(FACTOR_KEYS, (fa, fc, fd), strict=True)),
            "samples_alone": len(alone), "samples_corun": len(both),
            "decode_samples_alone": len(d_alone), "decode_samples_corun": len(d_both),
            "decode_over_profile_median": {"alone": float(np.median(d_alone)) if d_alone else None,
                                           "corun": float(np.median(d_both)) if d_both else None}}


def prefill_budget(model: str, mode: str) -> int:
    """The token budget of the worker that prefills in `mode` ('colocated' | 'disaggregated'),
    as `pdserve up` sets it for `model`."""
    up = cluster_from_dict({"model": model})
    return up.colocated.max_num_batched_tokens if mode == "colocated" else up.prefill.max_batch_tokens


def factors_of_run(requests: list[dict[str, Any]], profile: dict[str, Any], model: str, mode: str) -> dict[str, Any]:
    """factors_of for one run of `pdserve bench run` against `pdserve up`'s `mode` cluster of
    `model` (`pdserve calibrate`); profile: the step profile's contents."""
    return factors_of([requests], ProfiledModel.fit(profile), prefill_budget(model, mode), mode == "colocated")


def prefill_factors_from(compare: dict[str, Any], profile: str, budgets: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per mode of the compare (over all its rates): the three factors and their sample counts.
    budgets: per mode, the token budget of the worker that prefills (its policy's)."""
    model = ProfiledModel.load(profile)
    return {mode: factors_of([run["requests"] for run in m["runs"]], model, budgets[mode], mode == "colocated")
            for mode, m in compare["modes"].items()}
