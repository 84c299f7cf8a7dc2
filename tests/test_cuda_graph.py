"""The CUDA-graph decode path's CPU core: buckets, padding, static buffers, and the static-buffer
forward (what a graph captures) against the eager step, padding rows writing only the null block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdserve.config.engine import CacheConfig
from pdserve.engine.cuda_graph import (
    DecodeGraphs,
    DecodeRows,
    StaticInputs,
    bucket_for,
    buckets_up_to,
    decode_rows,
)
from pdserve.engine.model_runner import ModelRunner
from pdserve.sched.output import ScheduledChunk, SchedulerOutput
from pdserve.sched.request import Request

BS = 4


def test_buckets() -> None:
    assert buckets_up_to(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert buckets_up_to(10) == [1, 2, 4, 8, 10]
    b = buckets_up_to(64)
    assert [bucket_for(n, b) for n in (1, 2, 3, 5, 9, 17, 33, 49, 64)] == [1, 2, 4, 8, 16, 24, 48, 64, 64]
    assert bucket_for(65, b) is None and bucket_for(0, b) is None


def _req(rid: str, prompt: list[int], blocks: list[int], out: list[int] | None = None) -> Request:
    r = Request(rid, prompt, max_tokens=8, arrival_time=0.0, block_ids=blocks)
    r.output_token_ids = list(out or [])
    return r


def test_decode_rows_only_for_pure_decode() -> None:
    a = _req("a", [5, 6, 7, 8, 9], [7, 3], out=[11])
    a.num_computed_tokens = 5
    b = _req("b", [1, 2], [4])
    b.num_computed_tokens = 1
    rows = decode_rows(SchedulerOutput([ScheduledChunk(a, 1, True), ScheduledChunk(b, 1, True)]), BS)
    assert rows is not None
    assert rows.token_ids == [11, 2] and rows.positions == [5, 1]
    assert rows.slots == [3 * BS + 1, 4 * BS + 1] and rows.tables == [[7, 3], [4]]
    assert decode_rows(SchedulerOutput([ScheduledChunk(a, 1, True), ScheduledChunk(b, 2, True)]), BS) is None
    assert decode_rows(SchedulerOutput([ScheduledChunk(a, 1, False)]), BS) is None
    assert decode_rows(SchedulerOutput(), BS) is None


def test_fill_pads_to_the_null_block() -> None:
    inp = StaticInputs(max_batch=8, width=3, null_block=9, block_size=BS, device=torch.device("cpu"))
    rows = DecodeRows([11, 2, 5], [5, 1, 8], [13, 17, 24], [[7, 3], [4], [2, 5, 6]])
    assert inp.fill(rows, 4)
    assert inp.ids[:4].tolist() == [11, 2, 5, 0]
    assert inp.positions[:4].tolist() == [5, 1, 8, 0]
    assert inp.slots[:4].tolist() == [13, 17, 24, 9 * BS]  # the padding row writes the null slot
    assert inp.context_lens[:4].tolist() == [6, 2, 9, 1]
    assert inp.tables[3].tolist()[0] == 9 and inp.tables[0, :2].tolist() == [7, 3] and inp.tables[2].tolist() == [2, 5, 6]
    meta = inp.metadata(4)
    assert meta.slot_mapping.shape == (4,) and meta.block_tables.shape == (4, 3)
    # A smaller step later: the rows beyond it are padding again, whatever the last step left there.
    assert inp.fill(DecodeRows([3], [0], [8], [[2]]), 2)
    assert inp.slots[:2].tolist() == [8, 9 * BS] and inp.context_lens[:2].tolist() == [1, 1]
    assert not inp.fill(DecodeRows([3], [12], [1], [[1, 2, 3, 4]]), 1)  # wider than the buffers: eager


@pytest.fixture(scope="module")
def runner(tiny_models: dict[str, Path]) -> ModelRunner:
    return ModelRunner(str(tiny_models["llama"]), CacheConfig(block_size=BS, num_blocks=40), dtype="float32")


def test_static_forward_matches_the_eager_step(runner: ModelRunner) -> None:
    null = runner.num_blocks - 1  # kept out of every request's table below
    graphs = DecodeGraphs(runner, max_batch=8, null_block=null, capture=False)
    g = torch.Generator().manual_seed(1)
    free = torch.randperm(null, generator=g).tolist()  # shuffled physical blocks
    reqs = []
    for i, n in enumerate((5, 9, 3)):  # partial last blocks, and one (3 + 1 tokens) exactly full
        nb = -(-(n + 1) // BS)
        blocks, free = free[:nb], free[nb:]
        reqs.append(_req(f"r{i}", torch.randint(3, runner.shape.vocab_size, (n,), generator=g).tolist(), blocks))
    prefill = SchedulerOutput([ScheduledChunk(r, r.num_prompt_tokens, True) for r in reqs])
    assert graphs.run(prefill) is None  # a prefill step is not for a graph
    first = runner.execute(prefill).argmax(-1).tolist()
    for r, t in zip(reqs, first, strict=True):
        r.num_computed_tokens = r.num_prompt_tokens
        r.output_token_ids.append(t)
    step = SchedulerOutput([ScheduledChunk(r, 1, True) for r in reqs])
    for c in runner.kv_caches:
        c[:, null] = 7.0  # a sentinel, to see the padding row's write land
    before = [c.clone() for c in runner.kv_caches]
    eager = runner.execute(step)
    after_eager = [c.clone() for c in runner.kv_caches]
    for c, b in zip(runner.kv_caches, before, strict=True):
        c.copy_(b)
    static = graphs.run(step)  # 3 rows in the bucket of 4: one padding row
    assert static is not None and static.shape == eager.shape
    torch.testing.assert_close(static, eager, atol=2e-4, rtol=1e-4)
    assert static.argmax(-1).tolist() == eager.argmax(-1).tolist()
    used = sorted({b for r in reqs for b in r.block_ids})
    untouched = [b for b in range(null) if b not in used]
    for c, e, b in zip(runner.kv_caches, after_eager, before, strict=True):
        torch.testing.assert_close(c[:, used], e[:, used], atol=1e-4, rtol=1e-4)  # what eager wrote
        assert torch.equal(c[:, untouched], b[:, untouched])  # padding wrote into no block a request could own
        assert not torch.equal(c[:, null, 0], b[:, null, 0])  # ...but into the null slot
        assert torch.equal(c[:, null, 1:], b[:, null, 1:])
