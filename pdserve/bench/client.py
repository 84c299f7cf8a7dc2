"""The load client: send a list of `RequestSpec`s to an OpenAI-compatible server at their arrival times.

Each request is a streamed `/v1/completions` call with a token-id prompt of exactly the spec's length
and `max_tokens` = the spec's output length with `ignore_eos`, so lengths are exact. The client
asks for `return_token_ids` (a vLLM extension pdserve serves): then each chunk says which tokens it
carries, and TTFT and the gaps are taken per token event, so tokens that decode to no visible text
(a partial character held back, whitespace-only pieces) still count. Servers that do not send ids
are timed per non-empty text chunk. Per request it records the send time, TTFT, every gap, E2E
latency, the server's phase timings (the final chunk's `timings` object) and success or the error. Times are measured from the moment the request
is sent, as `vllm bench serve` does; `lag_s` says how late the client sent it (event-loop delay or
`max_concurrency`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

from pdserve.workload import RequestSpec


@dataclass
class RequestRecord:
    index: int
    arrival_s: float  # scheduled, from the start of the run
    prompt_tokens: int
    output_tokens: int  # asked for
    lag_s: float = 0.0  # sent this long after the scheduled arrival
    generated_tokens: int = 0  # the server's usage count (or chunks seen, when usage is missing)
    ttft_s: float = float("nan")
    e2el_s: float = float("nan")
    itl_s: list[float] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache (usage details)
    timed_by: str = ""  # "tokens" (the server sent token ids per chunk) or "text" (non-empty chunks)
    timings: dict[str, float] = field(default_factory=dict)
    success: bool = False
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("ttft_s", "e2el_s"):
            if d[k] != d[k]:  # NaN is not JSON
                d[k] = None
        return d


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float  # first send to last completion


def _events(line: str) -> dict[str, Any] | None:
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


async def send_one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
                   rec: RequestRecord, t0: float) -> RequestRecord:
    """Stream one completion into `rec` (times relative to the send)."""
    body = {"model": model, "prompt": prompt, "max_tokens": rec.output_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.0, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    start = time.perf_counter()
    rec.lag_s = max(0.0, start - t0 - rec.arrival_s)
    last = start
    chunks = 0
    usage: int | None = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {text[:300]}"
                return rec
            async for line in resp.aiter_lines():
                ev = _events(line)
                if ev is None:
                    continue
                now = time.perf_counter()
                if "error" in ev:
                    rec.error = str(ev["error"].get("message", ev["error"]))[:300]
                    return rec
                if ev.get("usage"):
                    usage = int(ev["usage"]["completion_tokens"])
                    details = ev["usage"].get("prompt_tokens_details") or {}
                    rec.cached_tokens = int(details.get("cached_tokens") or 0)
                for ch in ev.get("choices", []):
                    if "token_ids" in ch:
                        rec.timed_by = "tokens"
                        event = bool(ch["token_ids"])
                    else:
                        event = bool(ch.get("text"))
                        rec.timed_by = rec.timed_by or ("text" if event else "")
                    if event:
                        if chunks == 0:
                            rec.ttft_s = now - start
                        else:
                            rec.itl_s.append(now - last)
                        chunks += 1
                        last = now
                if "timings" in ev:
                    rec.timings = {k: float(v) for k, v in ev["timings"].items()}
        rec.e2el_s = last - start
        rec.generated_tokens = usage if usage is not None else chunks
        rec.success = chunks > 0
        if not rec.success:
            rec.error = "no tokens streamed" if not usage else f"{usage} tokens generated but none streamed"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]
    if not rec.success:
        rec.ttft_s = rec.e2el_s = float("nan")
    return rec


async def run_requests(url: str, model: str, specs: list[RequestSpec], prompts: list[list[int]],
                       max_concurrency: int | None = None, progress: bool = True,
                       timeout_s: float = 600.0) -> RunResult:
    """Send every spec at its arrival time; returns the records in spec order."""
    url = url.rstrip("/")
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(specs), desc="requests", unit="req", disable=not progress, leave=False)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        t0 = time.perf_counter()
        ends: list[float] = []

        async def one(i: int, spec: RequestSpec, prompt: list[int]) -> RequestRecord:
            rec = RequestRecord(i, spec.arrival_s, spec.prompt_tokens, spec.output_tokens)
            await asyncio.sleep(max(0.0, t0 + spec.arrival_s - time.perf_counter()))
            if sem is None:
                await send_one(client, url, model, prompt, rec, t0)
            else:
                async with sem:
                    await send_one(client, url, model, prompt, rec, t0)
            ends.append(time.perf_counter())
            bar.update(1)
            return rec

        records = await asyncio.gather(*(one(i, s, p) for i, (s, p) in enumerate(zip(specs, prompts, strict=True))))
    bar.close()
    return RunResult(list(records), (max(ends) - t0) if ends else 0.0)
