"""Real faults on the KV path: chunks corrupted and connections cut mid-transfer, and a prefill
slower than every timeout that still reports progress. Apart from test_faults.py so that the two
slowest fault files run on different pytest-xdist workers."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from tests.test_cluster import _up, _wait_for, _worker_gauge
from tests.test_faults import _config, _stream_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def no_fault_run(tiny_models) -> tuple[list[list[int]], list[list[int]]]:
    """The prompts and their tokens from a 1P1D cluster without faults: the same reference for both
    transports (computed once: a cluster start and 60 requests less)."""
    folder = tiny_models["llama"]
    rng = random.Random(9)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.choice([20, 50, 90]))] for _ in range(60)]
    with _up(str(folder), "--prefill", "1", "--decode", "1") as ref:
        return prompts, asyncio.run(_stream_all(ref.url, str(folder), prompts, 12))


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_transfer_faults_never_give_wrong_tokens(tiny_models, tmp_path, transport, no_fault_run):
    """KV chunks corrupted and connections cut mid-transfer: outputs stay right, blocks come back."""
    folder = tiny_models["llama"]
    prompts, want = no_fault_run
    cfg = _config(tmp_path, f"transfer: {{transport: {transport}, fault_corrupt_prob: 0.05, fault_cut_prob: 0.03}}\n")
    with _up(str(folder), "--config", cfg, "--prefill", "1", "--decode", "2") as srv:
        start = _worker_gauge(srv.url, "kv_free_blocks")
        got = asyncio.run(_stream_all(srv.url, str(folder), prompts, 12))
        assert got == want
        assert "KV transfer failed" in srv.output() or "attempt" in srv.output()
        _wait_for(lambda: _worker_gauge(srv.url, "kv_free_blocks") == start, timeout=30)


def test_long_prefill_keeps_its_decode_reservation(tiny_models, tmp_path):
    """A prefill that takes longer than the decode reservation timeout and the router's first-token
    timeout (12 chunks, each step slowed by 300 ms; both timeouts 2 s) but reports progress as it
    goes: its reservation is renewed, the router waits, and it completes on the first attempt. A
    silent prefill worker still loses them (test_failure_semantics.py, test_up_behaviour.py)."""
    folder = str(tiny_models["llama"])
    cfg = _config(tmp_path, "fault_prefill_delay_ms: 300\nprefill: {chunk_tokens: 16}\n"
                            "decode: {reservation_timeout_s: 2.0}\nrouter: {first_token_timeout_s: 2.0}\n")
    prompt = [(7 * i) % 250 + 3 for i in range(192)]
    with _up(folder, "--config", cfg, "--prefill", "1", "--decode", "1") as srv:
        r = httpx.post(srv.url + "/v1/completions", timeout=120, json={
            "model": folder, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        (t,) = r.json()["timings"]
        assert "retries" not in t and "transfer" in t, t  # the first attempt's KV went to decode...
        assert t["prefill"] > 2.0, t  # ...after a prefill that outlasted both timeouts
        assert "expired" not in srv.output() and "silent for" not in srv.output(), srv.tail()
        assert r.json()["usage"]["completion_tokens"] == 4
