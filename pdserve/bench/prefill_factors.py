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
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pdserve.sim.profile import ProfiledModel

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


def prefill_factors_from(compare: dict[str, Any], profile: str, budgets: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per mode of the compare (over all its rates): the two factors and their sample counts.
    budgets: per mode, the token budget of the worker that prefills (its policy's)."""
    model = ProfiledModel.load(profile)
    out: dict[str, dict[str, Any]] = {}
    for mode, m in compare["modes"].items():
        samples = [s for run in m["runs"] for s in step_samples(run["requests"], model, budgets[mode],
                                                                mode == "colocated")]
        alone = [f for f, c in samples if not c]
        both = [f for f, c in samples if c]
        fa = float(np.median(alone)) if alone else 1.0
        fc = float(np.median(both)) if len(both) >= MIN_SAMPLES else fa
        out[mode] = {"prefill_factor": fa, "corun_prefill_factor": fc, "samples_alone": len(alone),
                     "samples_corun": len(both)}
    return out
