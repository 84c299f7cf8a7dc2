"""The load client against an in-process fake SSE server, and `pdserve bench run` against a real one."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import pytest

from pdserve.bench.client import RequestRecord, send_one
from pdserve.bench.prompts import synth_prompts
from pdserve.workload import RequestSpec


def _chunk(**body: object) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _handler(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    assert body["stream"] and body["ignore_eos"] and isinstance(body["prompt"], list)
    n = body["max_tokens"]
    if n == 99:
        return httpx.Response(400, json={"error": {"message": "too long"}})
    parts = [_chunk(choices=[{"index": 0, "text": f" t{i}", "finish_reason": None}]) for i in range(n)]
    if n == 7:
        parts.append(_chunk(error={"message": "worker died", "code": 503}))
    parts.append(_chunk(choices=[{"index": 0, "text": "", "finish_reason": "length"}],
                        timings={"prefill": 0.01, "decode": 0.02}))
    parts.append(_chunk(choices=[], usage={"prompt_tokens": len(body["prompt"]), "completion_tokens": n}))
    parts.append(b"data: [DONE]\n\n")
    return httpx.Response(200, content=b"".join(parts), headers={"content-type": "text/event-stream"})


def _send(output_tokens: int) -> RequestRecord:
    async def go() -> RequestRecord:
        async with httpx.AsyncClient(transport=httpx.MockTransport(_handler)) as client:
            rec = RequestRecord(0, 0.0, 3, output_tokens)
            return await send_one(client, "http://fake", "demo", [7, 8, 9], rec, t0=0.0)

    return asyncio.run(go())


def test_client_records_tokens_gaps_and_timings() -> None:
    rec = _send(5)
    assert rec.success and not rec.error
    assert rec.generated_tokens == 5 and len(rec.itl_s) == 4  # the empty final chunk is not a token
    assert rec.timings == {"prefill": 0.01, "decode": 0.02}
    assert 0 <= rec.ttft_s <= rec.e2el_s


def test_client_reports_errors() -> None:
    bad = _send(99)
    assert not bad.success and bad.error.startswith("HTTP 400") and math.isnan(bad.ttft_s)
    mid = _send(7)  # an error event after some tokens: a failed request, not a short success
    assert not mid.success and "worker died" in mid.error


def test_prompts_exact_and_reproducible() -> None:
    specs = [RequestSpec(0.0, n, 1) for n in (1, 17, 300)]
    ids = list(range(6, 100))
    a, b = synth_prompts(specs, ids, seed=3), synth_prompts(specs, ids, seed=3)
    assert a == b and [len(p) for p in a] == [1, 17, 300]
    assert all(6 <= t < 100 for p in a for t in p)
    assert synth_prompts(specs, ids, seed=4) != a


@pytest.mark.slow
def test_bench_run_against_real_server(tmp_path: Path) -> None:
    from pdserve.cli import main
    from tests.servers import running_server

    out = tmp_path / "run.json"
    with running_server(["serve", "--role", "colocated", "--model", "demo", "--threads", "1"]) as srv:
        rc = main(["bench", "run", "--url", srv.url, "--workload", "search-small", "--num-requests", "4",
                   "--rate", "inf", "--max-output-tokens", "6", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads(out.read_text())
    s = data["summary"]
    assert s["completed"] == 4 and s["failed"] == 0 and s["slo_attainment"] == 1.0
    reqs = data["requests"]
    assert all(r["generated_tokens"] == r["output_tokens"] for r in reqs)  # ignore_eos: exact lengths
    assert all(len(r["itl_s"]) == r["output_tokens"] - 1 for r in reqs)
    assert all(r["timed_by"] == "tokens" for r in reqs)  # the server says which tokens each chunk carries
    assert s["prefix_cache_hit_rate"] == 0.0 and s["p99_max_itl_ms"] > 0
    assert all({"queue", "prefill", "decode"} <= set(r["timings"]) for r in reqs)
    assert s["total_input_tokens"] == sum(r["prompt_tokens"] for r in reqs)
    assert data["machine"]["cpu_count"] and data["command"].startswith("pdserve")


def _ids_handler(request: httpx.Request) -> httpx.Response:
    """Token ids per chunk; tokens 1 and 2 decode to nothing visible (a character held back)."""
    body = json.loads(request.content)
    assert body["return_token_ids"]
    texts = ["", "", "ab", " c"]
    parts = [_chunk(choices=[{"index": 0, "text": t, "token_ids": [10 + i], "finish_reason": None}])
             for i, t in enumerate(texts)]
    parts.append(_chunk(choices=[], usage={"prompt_tokens": 3, "completion_tokens": 4}))
    parts.append(b"data: [DONE]\n\n")
    return httpx.Response(200, content=b"".join(parts), headers={"content-type": "text/event-stream"})


def test_client_times_token_events_not_text() -> None:
    async def go() -> RequestRecord:
        async with httpx.AsyncClient(transport=httpx.MockTransport(_ids_handler)) as client:
            return await send_one(client, "http://fake", "demo", [7, 8, 9], RequestRecord(0, 0.0, 3, 4), t0=0.0)

    rec = asyncio.run(go())
    assert rec.success and rec.timed_by == "tokens" and len(rec.itl_s) == 3 and rec.generated_tokens == 4
