"""Disaggregated serving through the router, with real worker processes on loopback.

Greedy output through the router equals Hugging Face transformers on the same weights (and so the
colocated engine, which tests/test_engine_vs_hf.py ties to transformers), for every architecture.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import running_server
from tests.test_engine_vs_hf import _hf_greedy

pytestmark = pytest.mark.slow
URL_RE = r"serving \S+ at (http://[0-9.:]+)/v1"
MAX_TOKENS = 12


def _up(model: str, *extra: str):  # type: ignore[no-untyped-def]
    args = ["up", "--model", model, "--threads", "1", "--port", "0", *extra]
    return running_server(args, port_flag=None, url_pattern=URL_RE, timeout=240)


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.choice([1, 5, 17, 40, 64, 100]))] for _ in range(n)]


async def _complete_all(url: str, model: str, prompts: list[list[int]], stream: bool) -> list[list[int] | str]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)

    async def one(p: list[int]) -> list[int] | str:
        if stream:
            text = ""
            s = await client.completions.create(model=model, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True)
            async for chunk in s:
                text += chunk.choices[0].text if chunk.choices else ""
            return text
        r = await client.completions.create(model=model, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                            extra_body={"return_token_ids": True})
        return r.choices[0].model_extra["token_ids"]

    try:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        await client.close()


def _worker_gauge(url: str, name: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == f"pdserve:worker_{name}":
            for s in fam.samples:
                out[s.labels["worker"]] = s.value
    return out


def _check_against_hf(url: str, folder, prompts, tokenizer, want=None) -> None:  # type: ignore[no-untyped-def]
    """Ids and streamed text through the router equal transformers' greedy output (`want`, if given,
    is that output for `prompts`, computed already)."""
    want = _hf_greedy(folder, prompts) if want is None else want
    got_ids = asyncio.run(_complete_all(url, str(folder), prompts, stream=False))
    assert got_ids == want
    got_text = asyncio.run(_complete_all(url, str(folder), prompts, stream=True))
    assert got_text == [tokenizer.decode(w, skip_special_tokens=True) for w in want]


@pytest.fixture(scope="module")
def llama_reference(tiny_models) -> tuple[list[list[int]], list[list[int]]]:  # type: ignore[no-untyped-def]
    """32 prompts and transformers' greedy tokens for them: one reference for both topologies below
    (transformers' generate took ~9 s for them)."""
    from transformers import AutoTokenizer

    folder = tiny_models["llama"]
    prompts = _prompts(32, len(AutoTokenizer.from_pretrained(str(folder))), seed=1)
    return prompts, _hf_greedy(folder, prompts)


@pytest.mark.parametrize("transport,p,d", [("tcp", 1, 1), ("shm", 2, 2)])
def test_llama_disaggregated_matches_transformers(tiny_models, llama_reference, transport, p, d):
    from transformers import AutoTokenizer

    folder = tiny_models["llama"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    prompts, want = llama_reference
    with _up(str(folder), "--prefill", str(p), "--decode", str(d), "--transport", transport) as srv:
        start = _worker_gauge(srv.url, "kv_free_blocks")
        _check_against_hf(srv.url, folder, prompts, tok, want)
        assert all(v == 1 for v in _worker_gauge(srv.url, "up").values())
        # Every block back once the requests are done (prefill frees after its transfer ends).
        _wait_for(lambda: _worker_gauge(srv.url, "kv_free_blocks") == start)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_other_architectures_disaggregated(tiny_models, arch):
    from transformers import AutoTokenizer

    folder = tiny_models[arch]
    tok = AutoTokenizer.from_pretrained(str(folder))
    with _up(str(folder), "--prefill", "1", "--decode", "1") as srv:
        _check_against_hf(srv.url, folder, _prompts(8, len(tok), seed=3), tok)


def test_conditional_disaggregation_and_colocated_pool(tiny_models):
    """Short prompts skip prefill and a colocated worker serves them whole; long ones go through
    prefill, KV transfer and decode. Each request's phase timings say which path it took; outputs
    match transformers either way."""
    from transformers import AutoTokenizer

    folder = tiny_models["llama"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    prompts = _prompts(12, len(tok), seed=7)
    short = [len(p) < 30 for p in prompts]
    assert any(short) and not all(short)
    with _up(str(folder), "--prefill", "1", "--decode", "1", "--colocated", "1", "--disagg-threshold", "30") as srv:
        want = _hf_greedy(folder, prompts)
        bodies = [httpx.post(srv.url + "/v1/completions", timeout=120, json={
            "model": str(folder), "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True}).json() for p in prompts]
        assert [b["choices"][0]["token_ids"] for b in bodies] == want
        for p, is_short, b in zip(prompts, short, bodies, strict=True):
            timings = b["timings"][0]
            # Disaggregated: the prefill worker queued and computed it, then its KV moved to the
            # decode worker ("transfer"). Served whole: one worker's queue and prefill, no transfer.
            disaggregated = "transfer" in timings and "prefill_queue" in timings
            served_whole = "queue" in timings and "prefill" in timings and "transfer" not in timings
            assert (served_whole, disaggregated) == (is_short, not is_short), (len(p), timings)
            # The decode reservation is the part of the router's queue before the Prefill went out.
            assert not disaggregated or 0 <= timings["router_reserve"] <= timings["router_queue"], timings
        # ...and "whole" means on the colocated worker: it has computed something.
        def colocated_busy() -> list[float]:
            return [v for w, v in _worker_gauge(srv.url, "busy_fraction").items() if w.startswith("colocated")]

        _wait_for(lambda: len(colocated_busy()) == 1 and colocated_busy()[0] > 0, timeout=10)  # next heartbeat


def test_client_aborts_free_every_block(tiny_models):
    """200 requests, half dropped mid-stream by the client: every worker's free blocks come back."""
    from transformers import AutoTokenizer

    folder = tiny_models["llama"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    prompts = _prompts(200, len(tok), seed=11)
    with _up(str(folder), "--prefill", "1", "--decode", "1") as srv:
        start = _worker_gauge(srv.url, "kv_free_blocks")

        async def run() -> list[bool]:
            sem = asyncio.Semaphore(24)
            async with httpx.AsyncClient(timeout=120) as client:
                async def one(i: int, p: list[int]) -> bool:
                    async with sem:
                        body = {"model": str(folder), "prompt": p, "max_tokens": 40, "temperature": 0,
                                "ignore_eos": True, "stream": True}
                        async with client.stream("POST", srv.url + "/v1/completions", json=body) as r:
                            n = 0
                            async for line in r.aiter_lines():
                                if line.startswith("data: ") and i % 2 and (n := n + 1) >= 3:
                                    return False  # hang up mid-stream
                                if line == "data: [DONE]":
                                    return True
                        return False
                return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

        done = asyncio.run(run())
        assert sum(done) == 100
        _wait_for(lambda: _worker_gauge(srv.url, "kv_free_blocks") == start, timeout=30)
        r = httpx.post(srv.url + "/v1/completions", json={"model": str(folder), "prompt": [5, 6, 7],
                                                          "max_tokens": 3}, timeout=60)
        assert r.status_code == 200


def _wait_for(cond, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    assert cond()
