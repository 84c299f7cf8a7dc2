"""Seeded sampling is a pure function of (seed, output position): resumed, batched, on any role."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random

import httpx
import pytest
import torch

from pdserve.engine.llm import LLM
from pdserve.engine.sampler import SamplingParams, sample, seed_key, uniforms
from tests.test_cluster import _up


def _splitmix64(key: int, n: int) -> list[float]:
    """Reference SplitMix64 in plain Python integers (what the tensor version must equal)."""
    mask, s, out = (1 << 64) - 1, key & ((1 << 64) - 1), []
    for _ in range(n):
        s = (s + 0x9E3779B97F4A7C15) & mask
        z = ((s ^ (s >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(((z ^ (z >> 31)) >> 11) * 2.0**-53 + 2.0**-54)
    return out


def test_noise_is_splitmix64_of_the_key() -> None:
    keys = [seed_key(s, i) for s, i in [(0, 0), (1, 0), (0, 1), (-(2**80), 5), (2**70, 12345)]]
    got = uniforms(torch.tensor(keys, dtype=torch.int64), 300)
    for row, k in zip(got.tolist(), keys, strict=True):
        assert row == _splitmix64(k, 300)
    assert len({seed_key(s, i) for s in range(50) for i in range(50)}) == 2500


def test_seeded_draws_follow_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    for p in [SamplingParams(temperature=0.7, seed=3), SamplingParams(temperature=1.0, top_k=3, seed=4),
              SamplingParams(temperature=1.0, top_p=0.8, seed=5)]:
        n = 6000
        counts = [0] * 5
        for i in range(n):
            counts[sample(logits, [p], [i])[0]] += 1
        x = logits[0] / p.temperature
        if p.top_k > 0:
            x[3] = float("-inf")
        if p.top_p < 1:  # mass before token 2 (0.665 + 0.245) already reaches 0.8
            x[2:] = float("-inf")
        want = torch.softmax(x, -1).tolist()
        assert counts[4] == 0
        for c, w in zip(counts, want, strict=True):
            assert abs(c / n - w) < 4 * math.sqrt(w * (1 - w) / n) + 1e-9, (p, counts, want)


def test_a_seeded_draw_ignores_the_batch() -> None:
    """The same row in another batch, at another index, next to other requests: same token."""
    rng = random.Random(0)
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.0, seed=rng.randrange(100)) for _ in range(8)]
    steps = [rng.randrange(30) for _ in range(8)]
    together = sample(logits, params, steps)
    for r in range(8):
        mixed = [r, *[(r + j) % 8 for j in (3, 5)]]
        alone = sample(logits[mixed], [params[i] for i in mixed], [steps[i] for i in mixed])
        assert alone[0] == together[r]
    greedy = SamplingParams(temperature=0)
    assert sample(logits[:2], [greedy, params[1]], [0, steps[1]]) == [int(logits[0].argmax()), together[1]]


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:  # type: ignore[no-untyped-def]
    return LLM(str(tiny_models["llama"]), kv_cache_memory_gb=0.05)


@pytest.mark.parametrize("extra", [{}, {"top_k": 20}, {"top_p": 0.9}])
def test_resumed_request_draws_what_it_would_have_drawn(llm: LLM, extra: dict) -> None:
    """Token i of a seeded request is the same whether it ran from the start or was resumed at k
    (re-prefilled with its first k tokens appended to the prompt), as the router does on failover."""
    prompt = [5, 17, 99, 4, 250, 31]
    p = SamplingParams(max_tokens=20, temperature=1.2, seed=1234, ignore_eos=True, **extra)
    full = llm.generate(prompt, p)[0].outputs[0].token_ids
    assert len(set(full)) > 5  # really sampled, not a fixed point
    for k in (1, 6, 19):
        resumed = dataclasses.replace(p, max_tokens=20 - k, output_offset=k)
        got = llm.generate(prompt + full[:k], resumed)[0].outputs[0].token_ids
        assert got == full[k:], k
    other = llm.generate(prompt, dataclasses.replace(p, seed=1235))[0].outputs[0].token_ids
    assert other != full


@pytest.mark.slow
def test_prefill_and_decode_roles_sample_the_positions_colocated_does(tiny_models, llm: LLM) -> None:
    """1P1D: the first token is sampled on the prefill worker (position 0), the rest on decode
    (positions 1..); the tokens equal the offline colocated engine's for the same seeds."""
    folder = str(tiny_models["llama"])
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.choice([3, 20]))] for _ in range(6)]
    want = [llm.generate(pr, SamplingParams(max_tokens=10, temperature=1.0, seed=i, ignore_eos=True))[0]
            .outputs[0].token_ids for i, pr in enumerate(prompts)]

    async def run(url: str) -> list[list[int]]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int) -> list[int]:
                body = {"model": folder, "prompt": prompts[i], "max_tokens": 10, "temperature": 1.0,
                        "seed": i, "ignore_eos": True, "return_token_ids": True}
                r = await client.post(url + "/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["token_ids"]
            return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))

    with _up(folder, "--prefill", "1", "--decode", "1", "--colocated", "0") as srv:
        assert asyncio.run(run(srv.url)) == want
