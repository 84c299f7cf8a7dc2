"""Graph-safe paged decode attention against a naive per-sequence reference: shuffled blocks,
partial last blocks, GQA groups, contexts of one token. The Triton kernel runs under Triton's
interpreter in a subprocess (TRITON_INTERPRET must be set before triton is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pdserve.model.paged_attention_triton import num_splits_for, paged_decode, paged_decode_torch

# (block_size, heads, kv_heads, head_dim, dtype)
CASES = [(4, 8, 2, 32, torch.float32), (16, 4, 4, 64, torch.float32), (1, 6, 2, 16, torch.float32),
         (16, 8, 2, 64, torch.bfloat16)]


def naive(q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    bs, group = cache.shape[2], q.shape[1] // cache.shape[3]
    for b in range(q.shape[0]):
        n = int(lens[b])
        blocks = tables[b, : -(-n // bs)].tolist()
        k = torch.cat([cache[0, x] for x in blocks])[:n].float()
        v = torch.cat([cache[1, x] for x in blocks])[:n].float()
        for h in range(q.shape[1]):
            w = torch.softmax(k[:, h // group] @ q[b, h].float() * scale, 0)
            out[b, h] = (w @ v[:, h // group]).to(q.dtype)
    return out


def make_case(bs: int, heads: int, kv: int, d: int, dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    num_blocks, width = 40, 8
    cache = torch.randn(2, num_blocks, bs, kv, d, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[: 3 * width].view(3, width).int()  # shuffled blocks
    lens = torch.tensor([1, bs * 3 + 1, bs * width], dtype=torch.int32)  # one token; partial; full table
    q = torch.randn(3, heads, d, generator=g).to(dtype)
    return q, cache, tables, lens


@pytest.mark.parametrize("case", CASES)
def test_torch_decode_matches_naive(case) -> None:  # type: ignore[no-untyped-def]
    q, cache, tables, lens = make_case(*case)
    tol = 1e-5 if case[-1] == torch.float32 else 2e-2
    torch.testing.assert_close(paged_decode_torch(q, cache, tables, lens, 0.3), naive(q, cache, tables, lens, 0.3),
                               atol=tol, rtol=tol)
    assert paged_decode(q, cache, tables, lens, 0.3).shape == q.shape  # CPU default: the torch path


def test_num_splits() -> None:
    assert num_splits_for(1, 8, 4096, num_sms=132) == 16  # batch 1: split to fill the device
    assert num_splits_for(64, 8, 4096, num_sms=132) == 1  # enough programs already
    assert num_splits_for(1, 8, 2, num_sms=132) == 2  # never more splits than blocks


SCRIPT = """
import json, sys, torch
sys.path.insert(0, "tests")
from test_paged_attention_triton import CASES, RUNS, make_case, naive
from pdserve.model.paged_attention_triton import paged_decode_triton
errs = []
for i, splits in RUNS:  # the interpreter is slow: a few programs each
    q, cache, tables, lens = make_case(*CASES[i])
    out = paged_decode_triton(q, cache, tables, lens, 0.3, num_splits=splits)
    errs.append(float((out.float() - naive(q, cache, tables, lens, 0.3).float()).abs().max()))
print(json.dumps(errs))
"""
RUNS = [(0, 3), (2, 1), (3, 3)]  # (case, splits): GQA 4:1 split 3 ways; block size 1, group 3; bf16


def test_triton_kernel_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    errs = json.loads(p.stdout.strip().splitlines()[-1])
    tols = [1e-5 if CASES[i][-1] == torch.float32 else 2e-2 for i, _ in RUNS]
    assert all(e <= t for e, t in zip(errs, tols, strict=True)), errs
