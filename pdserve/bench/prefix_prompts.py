"""Prompts that really share prefixes, from a trace's per-block hash ids (the Mooncake layout).

A Mooncake trace row lists `hash_ids`, one id per 512-token block of its prompt: equal ids mean
equal block contents, and (as in a prefix cache) equal prefixes up to that block. Each id becomes
one fixed run of token ids (seeded by the id), so two prompts share exactly the leading blocks
their ids share, and a prefix cache hits exactly where the trace says it would. `block_tokens`
scales the 512-token block down (lengths scale with it) so a trace fits a small model and two
CPU cores; the last block of a prompt may be partial, as in the trace.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pdserve.workload import RequestSpec, arrival_times

TRACE_BLOCK_TOKENS = 512  # the Mooncake traces' block


def prefix_prompt(hash_ids: list[int], input_length: int, vocab: list[int], block_tokens: int = TRACE_BLOCK_TOKENS,
                  seed: int = 0, cache: dict[int, list[int]] | None = None) -> list[int]:
    """The token prompt of one trace row: block `hash_ids[k]` -> `block_tokens` tokens fixed by
    (seed, id); `input_length` (in trace tokens) scaled by block_tokens / 512, at least 1 token,
    at most the blocks listed. `cache` memoises blocks across rows."""
    n = max(1, min(len(hash_ids) * block_tokens, round(input_length * block_tokens / TRACE_BLOCK_TOKENS)))
    out: list[int] = []
    for h in hash_ids:
        if len(out) >= n:
            break
        block = cache.get(h) if cache is not None else None
        if block is None:
            block = random.Random(seed * 1_000_003 + h).choices(vocab, k=block_tokens)
            if cache is not None:
                cache[h] = block
        out.extend(block)
    return out[:n]


def load_hash_trace(path: str | Path, vocab: list[int], block_tokens: int = TRACE_BLOCK_TOKENS,
                    num_requests: int = 0, rate: float | None = None, time_scale: float = 1.0,
                    max_output_tokens: int | None = None, max_prompt_tokens: int | None = None,
                    seed: int = 0) -> tuple[list[RequestSpec], list[list[int]]]:
    """(specs, prompts) of a JSON-lines trace with `timestamp` (ms), `input_length`,
    `output_length`, `hash_ids`. Arrivals: the trace's own times times `time_scale`, or Poisson
    at `rate` when given. Output lengths scale like prompts; caps clip (a clipped prompt keeps its
    leading blocks, so it still shares the prefix)."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if num_requests and len(rows) >= num_requests:
                break
    scale = block_tokens / TRACE_BLOCK_TOKENS
    cache: dict[int, list[int]] = {}
    times = (arrival_times(len(rows), rate, seed=seed) if rate is not None
             else [(r["timestamp"] - rows[0]["timestamp"]) / 1000.0 * time_scale for r in rows])
    specs, prompts = [], []
    for t, r in zip(times, rows, strict=True):
        prompt = prefix_prompt(r["hash_ids"], r["input_length"], vocab, block_tokens, seed, cache)
        if max_prompt_tokens is not None:
            prompt = prompt[:max_prompt_tokens]
        out = max(1, round(r["output_length"] * scale))
        if max_output_tokens is not None:
            out = min(out, max_output_tokens)
        specs.append(RequestSpec(t, len(prompt), out))
        prompts.append(prompt)
    return specs, prompts
