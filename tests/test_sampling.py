"""What temperature, top_k, top_p and seed do to the sampled distribution.

`sample` is drawn from many times on a small vocabulary and the counts are held to the exact
distribution (softmax of the logits over temperature, truncated and renormalised) with a
chi-squared test. Draws are seeded (one step per draw), so the test is deterministic: a failure is
a wrong distribution, not bad luck. Tokens outside the truncated support must never appear.
"""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.engine.sampler import SamplingParams, sample

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.3, -0.5, -1.2])
DRAWS = 3000
# Chi-squared critical values at p = 0.001 by degrees of freedom (no scipy in the environment).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def _exact(temperature: float, top_k: int = -1, top_p: float = 1.0) -> list[float]:
    """The distribution the parameters define (as vLLM does): temperature, then top-k, then top-p
    (keep the most likely tokens until their mass reaches top_p), renormalised."""
    weights = [math.exp(x / temperature) for x in LOGITS.tolist()]
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    keep = set(order[:top_k] if top_k > 0 else order)
    total = sum(weights[i] for i in keep)
    mass, nucleus = 0.0, set()
    for i in order:
        if i not in keep:
            continue
        if mass >= top_p:
            break
        nucleus.add(i)
        mass += weights[i] / total
    z = sum(weights[i] for i in nucleus)
    return [weights[i] / z if i in nucleus else 0.0 for i in range(len(weights))]


def _counts(params: SamplingParams, draws: int = DRAWS) -> list[int]:
    logits = LOGITS.repeat(draws, 1)
    tokens = sample(logits, [params] * draws, list(range(draws)))
    return [tokens.count(i) for i in range(len(LOGITS))]


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, -1, 1.0), (0.5, -1, 1.0), (2.0, -1, 1.0),  # temperature sharpens / flattens
    (1.0, 3, 1.0), (1.0, 2, 1.0),  # top-k
    (1.0, -1, 0.8), (1.0, -1, 0.5),  # top-p
    (0.7, 4, 0.9),  # all three
])
def test_distribution_matches_the_exact_one(temperature: float, top_k: int, top_p: float) -> None:
    want = _exact(temperature, top_k, top_p)
    got = _counts(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=1234))
    support = [i for i, p in enumerate(want) if p > 0]
    assert all(got[i] == 0 for i in range(len(want)) if want[i] == 0), (got, want)  # truncation is exact
    if len(support) == 1:
        assert got[support[0]] == DRAWS
        return
    chi2 = sum((got[i] - DRAWS * want[i]) ** 2 / (DRAWS * want[i]) for i in support)
    assert chi2 < CHI2_999[len(support) - 1], (chi2, got, [round(DRAWS * w) for w in want])


def test_the_exact_distributions_differ() -> None:
    """The cases above are not all one distribution (a sampler ignoring a knob must fail them)."""
    assert _exact(0.5)[0] > _exact(1.0)[0] > _exact(2.0)[0]
    assert sum(p > 0 for p in _exact(1.0, top_k=2)) == 2
    assert sum(p > 0 for p in _exact(1.0, top_p=0.5)) < sum(p > 0 for p in _exact(1.0, top_p=0.8)) < 6


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=1.5, top_k=1)])
def test_greedy(params: SamplingParams) -> None:
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    assert sample(logits, [params] * 16, [0] * 16) == logits.argmax(-1).tolist()


def test_seed_reproducible_per_step_and_independent_of_the_batch() -> None:
    p = SamplingParams(temperature=1.0, seed=7)
    steps = list(range(64))
    alone = [sample(LOGITS[None], [p], [s])[0] for s in steps]
    assert sample(LOGITS.repeat(64, 1), [p] * 64, steps) == alone  # same tokens batched or not
    # Rows of other requests around it change nothing.
    others = SamplingParams(temperature=1.0, seed=99)
    mixed = sample(LOGITS.repeat(128, 1), [others, p] * 64, [s for s in steps for _ in range(2)])
    assert mixed[1::2] == alone
    assert len(set(alone)) > 1  # the steps draw different tokens...
    assert [sample(LOGITS[None], [SamplingParams(temperature=1.0, seed=8)], [s])[0] for s in steps] != alone  # ...and seeds differ
