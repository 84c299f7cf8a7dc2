"""Leaks: 1,000 requests through 1P2D with injected transfer faults and random client aborts;
afterwards every worker's free KV blocks are back at their start and the cluster still serves."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from tests.test_cluster import _up, _wait_for, _worker_gauge
from tests.test_faults import _config

pytestmark = pytest.mark.slow
N = 1000
CONCURRENCY = 32


async def _run(url: str, model: str, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    plan = []
    for _ in range(N):
        prompt = [rng.randrange(3, 300) for _ in range(rng.choice([3, 9, 17, 33, 40]))]
        abort_after = rng.choice([0, 1, 2, 3]) if rng.random() < 0.2 else None  # chunks read before hanging up
        plan.append((prompt, rng.randint(1, 8), abort_after))
    counts = {"done": 0, "aborted": 0, "failed": 0}
    sem = asyncio.Semaphore(CONCURRENCY)
    t0 = time.monotonic()
    failures: list[str] = []
    slow: list[float] = []

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CONCURRENCY + 8)) as client:
        async def one(prompt: list[int], max_tokens: int, abort_after: int | None) -> None:
            try:
                await one_(prompt, max_tokens, abort_after)
            finally:
                total = sum(counts.values())
                if total % 100 == 0:
                    print(f"  {total}/{N} requests ({counts}) after {time.monotonic() - t0:.1f}s", flush=True)

        async def one_(prompt: list[int], max_tokens: int, abort_after: int | None) -> None:
            async with sem:
                t_req = time.monotonic()
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                async with client.stream("POST", url + "/v1/completions", json=body) as r:
                    if abort_after == 0:
                        counts["aborted"] += 1
                        return  # hang up as soon as the status line arrives
                    n, ok = 0, False
                    text = []
                    async for line in r.aiter_lines():
                        text.append(line)
                        if line.startswith("data: {"):
                            n += 1
                            if abort_after is not None and n >= abort_after:
                                counts["aborted"] += 1
                                return  # hang up mid-stream
                        if line == "data: [DONE]":
                            ok = r.status_code == 200 and not any('"error"' in t for t in text)
                    if time.monotonic() - t_req > 5:  # a stalled KV transfer holds a request ~30 s
                        slow.append(time.monotonic() - t_req)
                    if ok:
                        counts["done"] += 1
                    else:
                        counts["failed"] += 1
                        failures.append(f"{r.status_code}: {' | '.join(text)[-300:]}")
        await asyncio.gather(*(one(*p) for p in plan))
    if failures:
        print("failures:", *failures[:5], sep="\n  ")
    if slow:
        print(f"{len(slow)} requests took over 5 s (longest {max(slow):.1f} s)")
    # A failed transfer must end its attempt at once, not after the 30 s transfer timeout.
    assert not [t for t in slow if t > 20], f"requests stuck behind a failed transfer: {slow}"
    return counts


def test_thousand_requests_with_faults_and_aborts_leak_nothing(tiny_models, tmp_path):
    folder = str(tiny_models["llama"])
    cfg = _config(tmp_path, "transfer: {fault_corrupt_prob: 0.02, fault_cut_prob: 0.01}\n")
    with _up(folder, "--config", cfg, "--prefill", "1", "--decode", "2") as srv:
        start = _worker_gauge(srv.url, "kv_free_blocks")
        assert len(start) == 3 and all(v > 0 for v in start.values())
        t0 = time.monotonic()
        counts = asyncio.run(_run(srv.url, folder, seed=6))
        print(f"{N} requests in {time.monotonic() - t0:.1f}s: {counts}")
        assert sum(counts.values()) == N
        assert counts["aborted"] >= N // 10
        assert counts["failed"] == 0, counts  # faults are retried or fall back: no request fails
        out = srv.output()
        assert "KV transfer failed" in out or "attempt" in out  # the faults really happened

        def back() -> bool:
            now = _worker_gauge(srv.url, "kv_free_blocks")
            return now == start

        try:
            _wait_for(back, timeout=15)  # well under the 30 s reservation expiry, which must not be what frees them
        finally:
            print("free blocks at start:", start, "now:", _worker_gauge(srv.url, "kv_free_blocks"))
            if not back():  # seen once in a full-suite run: name the request, if expiry is what frees it
                time.sleep(35)
                out = srv.output()
                print("after 35 s:", _worker_gauge(srv.url, "kv_free_blocks"))
                rids = [ln.split("for ")[1].split(" ")[0] for ln in out.splitlines() if "expired: its KV" in ln]
                print("expired:", rids)
                for rid in rids:
                    print("\n".join(ln for ln in out.splitlines() if rid.split("~")[0] in ln))
        assert all(v == 1 for v in _worker_gauge(srv.url, "up").values())
        r = httpx.post(srv.url + "/v1/completions", json={"model": folder, "prompt": [5, 6, 7], "max_tokens": 4,
                                                          "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4

