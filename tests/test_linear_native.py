"""The native small-batch linear kernel (pdserve/model/small_linear.c) against F.linear, its batch
invariance, its input checks, and the engine's choice between it and F.linear."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from pdserve.config.engine import CacheConfig
from pdserve.engine.model_runner import ModelRunner
from pdserve.model import native_build, small_linear
from pdserve.model.small_linear import NATIVE_LINEAR_OP, linear

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(isinstance(small_linear.library(), str), reason="no C compiler here")
# N and K off multiples of the 16 lanes and of the 6/8/16-row W tiles (N = 40, 301: a narrower last
# tile), K on and off them; N = 300, 301 also split over 2 threads. Every row count: the x tiles
# of 1..4 rows and their partial last tiles.
SHAPES = [(1, 1), (5, 3), (17, 33), (40, 512), (300, 70), (301, 32)]
ROWS = range(1, small_linear.MAX_ROWS + 1)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(bias: bool, two_threads) -> None:
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g) if bias else None
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            ref = F.linear(x.double(), w.double(), None if b is None else b.double()).float()
            ours = linear(x, w, b)
            assert ours.shape == (m, n)
            # float32 rounding of a K-term sum, no more: the same tolerance F.linear itself meets
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * k**0.5)
            torch.testing.assert_close(F.linear(x, w, b), ref, rtol=1e-5, atol=1e-5 * k**0.5)


@needs_kernel
def test_batch_invariant_bitwise() -> None:
    """Row i of an M-row call equals the 1-row call of that row bit for bit, for every M up to the
    kernel's limit and 1 or 2 threads (F.linear does not promise this: MKL picks kernels by M)."""
    g = torch.Generator().manual_seed(1)
    before = torch.get_num_threads()
    try:
        for n, k in [(300, 70), (40, 512), (301, 32)]:
            w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
            x = torch.randn(small_linear.MAX_ROWS, k, generator=g)
            torch.set_num_threads(1)
            alone = torch.cat([linear(x[i : i + 1], w, b) for i in range(len(x))])
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for m in range(1, len(x) + 1):
                    assert torch.equal(linear(x[:m], w, b), alone[:m]), (n, k, m, threads)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_portable_build_gives_the_same_bits() -> None:
    """The C fallback (built here without AVX-512) computes every element by the same sequence as
    the AVX-512 tiles: the same bits at every row count (on a CPU without AVX-512 both are it)."""
    portable = native_build.build(small_linear.SOURCE, (*small_linear.COMPILE_FLAGS, "-mno-avx512f"),
                                  small_linear.LINK_FLAGS)
    assert not isinstance(portable, str), portable
    g = torch.Generator().manual_seed(3)
    for n, k in [(300, 70), (40, 512)]:
        w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        x = torch.randn(small_linear.MAX_ROWS, k, generator=g)
        for m in range(1, len(x) + 1):
            y = torch.empty(m, n)
            portable.small_linear_f32(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(k), ctypes.c_void_p(w.data_ptr()),
                                      ctypes.c_int64(n), ctypes.c_int64(k), ctypes.c_void_p(b.data_ptr()),
                                      ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(n), ctypes.c_int64(m),
                                      ctypes.c_int(1))
            assert torch.equal(y, linear(x[:m], w, b)), (n, k, m)


@needs_kernel
def test_strided_rows_handled_other_layouts_refused() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 20, generator=g)
    wide = torch.randn(6, 50, generator=g)
    view = wide[:, 5:25]  # rows 50 apart, like q sliced out of the fused qkv output
    torch.testing.assert_close(linear(view, w), F.linear(view, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear(wide.view(2, 3, 50)[..., :20].contiguous(), w), F.linear(
        wide.view(2, 3, 50)[..., :20], w), rtol=1e-5, atol=1e-5)  # leading dims kept
    with pytest.raises(ValueError, match="unit-strided"):
        linear(wide[:, ::2][:, :20], w)  # columns strided
    with pytest.raises(ValueError, match="contiguous float32 W"):
        linear(view, torch.randn(20, 24, generator=g).t())
    with pytest.raises(ValueError, match="float32"):
        linear(view.bfloat16(), w)
    with pytest.raises(ValueError, match="bias"):
        linear(view, w, torch.randn(23, generator=g))


def test_choice_and_fallbacks(monkeypatch) -> None:
    """torch: never; auto: the measured rows, nothing where the kernel cannot run (bf16, cuda, no
    compiler); native: every decode-sized step, and an error where it cannot run."""
    assert small_linear.rows_for("torch", CPU, torch.float32) == range(0)
    assert small_linear.rows_for("auto", torch.device("cuda"), torch.float32) == range(0)
    assert small_linear.rows_for("auto", CPU, torch.bfloat16) == range(0)
    with pytest.raises(RuntimeError, match="float32 only"):
        small_linear.rows_for("native", CPU, torch.float16)
    with pytest.raises(RuntimeError, match="for cpu"):
        small_linear.rows_for("native", torch.device("cuda"), torch.float32)
    if not isinstance(small_linear.library(), str):
        assert small_linear.rows_for("auto", CPU, torch.float32) == small_linear.AUTO_ROWS
        assert small_linear.rows_for("native", CPU, torch.float32) == range(1, small_linear.MAX_ROWS + 1)
    monkeypatch.setenv("CC", "false")
    small_linear.library.cache_clear()
    try:
        assert small_linear.rows_for("auto", CPU, torch.float32) == range(0)
        with pytest.raises(RuntimeError, match="false failed"):
            small_linear.rows_for("native", CPU, torch.float32)
    finally:
        monkeypatch.undo()
        small_linear.library.cache_clear()


def _kernel_calls(runner: ModelRunner) -> tuple[int, torch.Tensor]:
    """Calls of the kernel in one real decode step of two sequences, and the step's logits."""
    from pdserve.sched import Request
    from pdserve.sched.output import ScheduledChunk, SchedulerOutput

    reqs = []
    for i in range(2):
        r = Request(f"s{i}", [3 + i, 5, 7, 9], max_tokens=1, arrival_time=0.0)
        r.block_ids = [i]
        r.num_computed_tokens = 3
        reqs.append(r)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits = runner.execute(SchedulerOutput([ScheduledChunk(r, 1, sample=True) for r in reqs]))
    return sum(e.count for e in prof.key_averages() if e.key == NATIVE_LINEAR_OP), logits


@needs_kernel
def test_default_engine_runs_it_on_cpu_float32(tiny_models) -> None:
    """The default setting runs a decode step's projections by the kernel (so the transformers
    equivalence tests exercise it); `torch` keeps F.linear, with logits within rounding."""
    folder = str(tiny_models["qwen2"])  # q/k/v biases
    # Layer by layer (by default the fused layer runs the same kernel code inside one call).
    auto = ModelRunner(folder, CacheConfig(block_size=4, num_blocks=8, decode_layer="torch"), dtype="float32")
    forced = ModelRunner(folder, CacheConfig(block_size=4, num_blocks=8, decode_linear="torch"), dtype="float32")
    assert auto.linear_rows == small_linear.AUTO_ROWS and forced.linear_rows == range(0)
    calls, logits = _kernel_calls(auto)
    assert calls == 4 * auto.shape.num_layers + 1  # qkv, o, gate_up, down per layer; lm_head
    torch_calls, torch_logits = _kernel_calls(forced)
    assert torch_calls == 0
    torch.testing.assert_close(logits, torch_logits, rtol=1e-4, atol=1e-4)
