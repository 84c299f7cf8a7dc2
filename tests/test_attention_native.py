"""The native CPU decode-attention kernel (pdserve/model/paged_decode.c) against the naive definition,
and the choice between it and the torch path (forced either way, fallback where it cannot run)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from pdserve.config.engine import CacheConfig
from pdserve.engine.model_runner import ModelRunner, step_metadata
from pdserve.model import native_decode
from pdserve.model.attention import paged_attention, reference_attention, write_kv
from tests.test_engine_paths import BS, _shuffled_tables

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(isinstance(native_decode.library(), str), reason="no C compiler here")


def _native_vs_reference(spans: list[tuple[list[int], int, int]], heads: int, kv_heads: int, d: int, seed: int):
    """Ours (native decode) and the reference on a random cache; q a strided view, as in the model."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, 1 + max(b for t, _, _ in spans for b in t), BS, kv_heads, d, generator=g)
    t = sum(n for _, _, n in spans)
    qkv = torch.randn(t, heads + 2 * kv_heads, d, generator=g)  # rows strided, like the fused projection
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    meta = step_metadata(spans, BS, CPU, native=True)
    write_kv(cache, k, v, meta.slot_mapping)
    ours = paged_attention(q, k, v, cache, meta, d**-0.5)
    ref = reference_attention(q, cache, [s[0] for s in spans], [s[2] for s in spans],
                              [s[1] + s[2] for s in spans], BS, d**-0.5)
    return ours, ref, meta


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,d", [(4, 4, 8), (6, 2, 16), (8, 1, 64), (32, 2, 128)])
def test_decode_batch_of_mixed_lengths(heads, kv_heads, d) -> None:
    """Contexts 1..301 in one batch (partial last blocks, one crossing 76 blocks), blocks shuffled
    through the cache, GQA groups of 1 to 16 query heads."""
    ctx = [38, 1, 17, 16, 5, 301, 4, 2]
    tables = _shuffled_tables(ctx, random.Random(heads + d), spare=5)
    ours, ref, meta = _native_vs_reference([(t, c - 1, 1) for t, c in zip(tables, ctx, strict=True)],
                                           heads, kv_heads, d, seed=d)
    assert meta.native is not None and not meta.decode  # one kernel call, no SDPA groups
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("ctx", [1, 4, 9, 200])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_sequence(ctx, threads) -> None:
    """With more threads than sequences each KV head is a task of its own (the other split)."""
    table = _shuffled_tables([ctx], random.Random(ctx), spare=5)[0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours, ref, _ = _native_vs_reference([(table, ctx - 1, 1)], 4, 2, 8, seed=ctx)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _direct(q: torch.Tensor, cache: torch.Tensor, tables: list[list[int]], ctx: list[int]) -> torch.Tensor:
    """native_decode.paged_decode over `tables` (one query row per sequence)."""
    width = max(len(t) for t in tables)
    d = native_decode.NativeDecode(rows=torch.arange(len(ctx), dtype=torch.int64),
                                   ctx_lens=torch.tensor(ctx, dtype=torch.int32),
                                   tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32))
    out = torch.zeros_like(q)
    native_decode.paged_decode(q, out, cache, d, q.shape[-1] ** -0.5)
    return out


@needs_kernel
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("heads,kv_heads,d", [(8, 4, 64), (4, 4, 128), (16, 4, 64), (2, 2, 64)])
def test_vector_path_blocks_of_16_and_32(bs, heads, kv_heads, d) -> None:
    """The AVX-512 path (head_dim 64/128, groups of 1/2/4/8; the demo model's 8/4 x 64) at the
    engine's block sizes (16-key chunks, two per block of 32; partial chunks, shuffled blocks),
    against the naive definition; a sequence's result is bitwise the same alone as in its batch,
    and at 1 or 2 threads (each KV head a task of its own)."""
    ctx = [1, 15, 16, 17, 47, 300, 33]
    tables = _shuffled_tables(ctx, random.Random(bs + d + heads), bs=bs)
    g = torch.Generator().manual_seed(d + heads)
    cache = torch.randn(2, sum(len(t) for t in tables) + 3, bs, kv_heads, d, generator=g)
    q = torch.randn(len(ctx), heads, d, generator=g)
    ours = _direct(q, cache, tables, ctx)
    ref = reference_attention(q, cache, tables, [1] * len(ctx), ctx, bs, d**-0.5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for b in (0, 5):
                assert torch.equal(_direct(q[b: b + 1], cache, [tables[b]], [ctx[b]])[0], ours[b])
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_decodes_packed_between_prefill_chunks() -> None:
    """Decode rows scattered through a step (between a fresh prompt and a later chunk): the kernel
    writes only its rows, and the prefill paths' rows are untouched by it."""
    ctx = [11, 10, 23, 6, 3]
    tables = _shuffled_tables(ctx, random.Random(5), spare=5)
    spans = [(tables[0], 0, 11), (tables[1], 9, 1), (tables[2], 16, 7), (tables[3], 5, 1), (tables[4], 2, 1)]
    ours, ref, meta = _native_vs_reference(spans, 6, 2, 8, seed=3)
    assert meta.native is not None and meta.native.rows.tolist() == [11, 19, 20]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_large_scores_do_not_overflow() -> None:
    """Scores in the hundreds: the online softmax's rescaling keeps every exp in range."""
    ctx = [70, 33]
    tables = _shuffled_tables(ctx, random.Random(9), spare=5)
    spans = [(t, c - 1, 1) for t, c in zip(tables, ctx, strict=True)]
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 1 + max(max(t) for t in tables), BS, 2, 16, generator=g) * 30
    q = torch.randn(2, 4, 16, generator=g) * 30
    meta = step_metadata(spans, BS, CPU, native=True)
    ours = paged_attention(q, cache[0, 0, :2], cache[1, 0, :2], cache, meta, 0.25)
    ref = reference_attention(q, cache, tables, [1, 1], ctx, BS, 0.25)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_forced_torch_path_and_fallbacks(tiny_models) -> None:
    """decode_attention = torch keeps SDPA groups; bf16 or a cuda device falls back under auto and
    is an error under native; an engine on float32 CPU with the default setting runs natively
    (so the transformers equivalence tests exercise the kernel)."""
    folder = str(tiny_models["llama"])
    forced = ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=8, decode_attention="torch"), dtype="float32")
    assert forced.native_decode is False
    auto = ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=8), dtype="float32")
    assert auto.native_decode is not isinstance(native_decode.library(), str)
    spans = [([1, 2], 5, 1), ([3], 2, 1)]
    assert step_metadata(spans, BS, CPU, native=False).native is None
    assert len(step_metadata(spans, BS, CPU, native=False).decode) == 2
    bf16 = ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=8), dtype="bfloat16")
    assert bf16.native_decode is False
    with pytest.raises(RuntimeError, match="float32 only"):
        ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=8, decode_attention="native"), dtype="bfloat16")
    assert not native_decode.choose("auto", torch.device("cuda"), torch.float32, 4, 2, 8, BS)
    assert not native_decode.choose("auto", CPU, torch.float32, 256, 2, 8, BS)  # 256 heads: past the limit


def test_no_working_compiler_falls_back(monkeypatch) -> None:
    """A compiler that fails (here `false`) leaves the torch path under auto, an error under native."""
    monkeypatch.setenv("CC", "false")
    native_decode.library.cache_clear()
    try:
        assert isinstance(native_decode.library(), str)
        assert native_decode.choose("auto", CPU, torch.float32, 4, 2, 8, BS) is False
        with pytest.raises(RuntimeError, match="false failed"):
            native_decode.choose("native", CPU, torch.float32, 4, 2, 8, BS)
    finally:
        monkeypatch.undo()
        native_decode.library.cache_clear()


def test_loading_the_kernel_leaves_the_process_floating_point_state_alone() -> None:
    # A library linked with -ffast-math (gcc 12) sets flush-to-zero / denormals-are-zero for the whole
    # process as it loads (gcc's crtfastmath.o): subnormals vanish in Python, numpy and torch alike
    # (hypothesis refuses to run; torch's numerics change). Checked in a fresh process, which the
    # kernel has not yet been loaded into.
    code = ("import sys, torch; from pdserve.model import native_decode as n; lib = n.library(); "
            "assert not isinstance(lib, str), lib; tiny = sys.float_info.min; "
            "assert tiny / 2 > 0, 'Python floats flushed to zero'; "
            "assert (torch.tensor(tiny, dtype=torch.float64) / 2).item() > 0, 'torch flushed to zero'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
