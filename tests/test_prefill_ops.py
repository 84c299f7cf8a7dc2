"""The per-op path's native element-wise ops (pdserve/model/prefill_ops.c) against the torch ops
they replace, a whole step through them against the torch path, the runner's choice of them, and
greedy tokens through them (chunked prompts, mixed steps) against the torch path and transformers."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pdserve import LLM, SamplingParams
from pdserve.config.engine import CacheConfig
from pdserve.engine.model_runner import ModelRunner, step_metadata
from pdserve.model import prefill_ops
from pdserve.model.attention import write_kv
from pdserve.model.prefill_ops import Kernels, PrefillOps
from pdserve.model.rope import rotate
from pdserve.sched.output import ScheduledChunk, SchedulerOutput
from pdserve.sched.request import Request
from tests.test_decode_layer import _decode_step
from tests.test_engine_paths import BS, _shuffled_tables
from tests.test_engine_vs_hf import ARCH_NAMES, MAX_TOKENS, _hf_greedy, _prompts

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(isinstance(prefill_ops.library(), str), reason="no C compiler here")
pytestmark = needs_kernel


@pytest.fixture(scope="module")
def runners(tiny_models) -> dict[str, ModelRunner]:
    cache = CacheConfig(block_size=BS, num_blocks=64, prefill_ops="native")
    return {arch: ModelRunner(str(tiny_models[arch]), cache, dtype="float32") for arch in ARCH_NAMES}


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _torch_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_())


@pytest.mark.parametrize("n", [48, 72, 512])
def test_add_rmsnorm(n, threads) -> None:
    """The residual add bitwise torch's x + delta; the norm within rounding of torch's formula;
    the norm alone (no delta) and in place (out = x) too."""
    g = torch.Generator().manual_seed(n)
    x, d, w = torch.randn(37, n, generator=g), torch.randn(37, n, generator=g), torch.randn(n, generator=g)
    k, out = Kernels(), torch.empty(37, n)
    ref_x = x + d
    k.add_rmsnorm(x, d, w, out, 1e-6)
    assert torch.equal(x, ref_x)
    torch.testing.assert_close(out, _torch_norm(ref_x, w, 1e-6), rtol=1e-5, atol=1e-6)
    k.add_rmsnorm(x, None, w, out, 1e-6)
    assert torch.equal(x, ref_x)
    torch.testing.assert_close(out, _torch_norm(ref_x, w, 1e-6), rtol=1e-5, atol=1e-6)
    k.add_rmsnorm(x, None, w, x, 1e-6)
    assert torch.equal(x, out)


@pytest.mark.parametrize("n", [100, 1536])
def test_silu_mul(n, threads) -> None:
    g = torch.Generator().manual_seed(n)
    gu = torch.randn(33, 2 * n, generator=g) * 6
    out = torch.empty(33, n)
    Kernels().silu_mul(gu, out)
    torch.testing.assert_close(out, F.silu(gu[:, :n]) * gu[:, n:], rtol=1e-6, atol=1e-6)


def _rope_case(runner: ModelRunner, t: int, seed: int):  # type: ignore[no-untyped-def]
    """qkv [t, ...] of the runner's shape, RoPE rows for scattered positions, a random cache, and
    slots of shuffled tables with partial last blocks (one sequence per 5 tokens)."""
    g = torch.Generator().manual_seed(seed)
    s = runner.shape
    qkv = torch.randn(t, (s.num_heads + 2 * s.num_kv_heads) * s.head_dim, generator=g)
    cos, sin = runner.model.rope.table(torch.randint(0, 300, (t,), generator=g), 300)
    cache = torch.randn(2, 64, BS, s.num_kv_heads, s.head_dim, generator=g)
    lens = [5] * (t // 5) + ([t % 5] if t % 5 else [])
    tables = _shuffled_tables([n + 3 for n in lens], random.Random(seed), spare=4)
    slots = torch.tensor([tb[p // BS] * BS + p % BS for tb, n in zip(tables, lens, strict=True)
                          for p in range(3, 3 + n)])
    return qkv, cos, sin, cache, slots


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_rope_and_kv_write_are_the_torch_ops(arch, runners, threads) -> None:
    """RoPE on q and k in place and the K/V rows in the cache: bitwise rope.rotate + write_kv
    (every other slot untouched), for each architecture's heads and head_dim."""
    runner = runners[arch]
    s = runner.shape
    qkv, cos, sin, cache, slots = _rope_case(runner, 23, seed=len(arch))
    nq, nk = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    ref_qk = rotate(qkv[:, : nq + nk].reshape(23, -1, s.head_dim), cos, sin).reshape(23, -1)
    ref_cache = cache.clone()
    write_kv(ref_cache, ref_qk[:, nq:].reshape(23, s.num_kv_heads, s.head_dim),
             qkv[:, nq + nk :].reshape(23, s.num_kv_heads, s.head_dim), slots)
    ref_v = qkv[:, nq + nk :].clone()
    Kernels().qkv_rope_kv(qkv, s.num_heads, cos, sin, None, None, 0.0, cache, slots)
    assert torch.equal(qkv[:, : nq + nk], ref_qk)
    assert torch.equal(qkv[:, nq + nk :], ref_v)
    assert torch.equal(cache, ref_cache)


def test_qk_norm_then_rope(runners, threads) -> None:
    """Qwen3: each q and k head RMSNormed (its q_norm / k_norm weights) before RoPE."""
    runner = runners["qwen3"]
    s, attn = runner.shape, runner.model.model.layers[0].self_attn
    qkv, cos, sin, cache, slots = _rope_case(runner, 17, seed=3)
    nq, nk, d = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.head_dim
    q = rotate(attn.q_norm(qkv[:, :nq].view(17, -1, d)), cos, sin)
    k = rotate(attn.k_norm(qkv[:, nq : nq + nk].view(17, -1, d)), cos, sin)
    Kernels().qkv_rope_kv(qkv, s.num_heads, cos, sin, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps,
                          cache, slots)
    torch.testing.assert_close(qkv[:, :nq].view(17, -1, d), q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, nq : nq + nk].view(17, -1, d), k, rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.flatten(1, 2)[0, slots], qkv[:, nq : nq + nk].view(17, -1, d))


@torch.inference_mode()  # as the runner's forward (out= refuses tensors that require grad)
def test_projections_into_buffers_are_f_linear() -> None:
    """The GEMM into the reused buffer (addmm / mm with out=) gives F.linear's bits, bias or not."""
    torch.manual_seed(0)
    x = torch.randn(40, 72)
    for layer in (torch.nn.Linear(72, 120), torch.nn.Linear(72, 56, bias=False)):
        out = torch.empty(40, layer.out_features)
        assert torch.equal(prefill_ops._linear(layer, x, out, False), F.linear(x, layer.weight, layer.bias))


def _mixed_step(runner: ModelRunner, seed: int):  # type: ignore[no-untyped-def]
    """A fresh prompt chunk, a later chunk of another prompt (its context in the cache), and three
    decodes, their blocks shuffled; random caches and ids."""
    g = torch.Generator().manual_seed(seed)
    s = runner.shape
    ctx = [7, 15, 9, 1, 22]
    starts = [0, 9, 8, 0, 21]
    tables = _shuffled_tables(ctx, random.Random(seed), spare=5)
    spans = [(t, st, c - st) for t, st, c in zip(tables, starts, ctx, strict=True)]
    caches = [torch.randn(2, 64, BS, s.num_kv_heads, s.head_dim, generator=g) for _ in range(s.num_layers)]
    meta = step_metadata(spans, BS, CPU, native=True)
    positions = torch.tensor([p for _, st, n in spans for p in range(st, st + n)])
    cos, sin = runner.model.rope.table(positions, max(ctx))
    meta.cos, meta.sin = cos, sin
    ids = torch.randint(3, s.vocab_size, (positions.numel(),), generator=g)
    return ids, positions, caches, meta


@pytest.mark.parametrize("arch", ARCH_NAMES)
@torch.inference_mode()
def test_a_mixed_step_matches_the_torch_path(arch, runners, threads) -> None:
    """Every layer and the final norm on a step of prefill chunks and decodes: hidden states and
    the K/V written, against the torch ops (within the norms' rounding); the KV hook runs per layer."""
    runner = runners[arch]
    ids, positions, caches, meta = _mixed_step(runner, seed=len(arch))
    ref_caches = [c.clone() for c in caches]
    ref = runner.model(ids, positions, ref_caches, meta)
    done: list[int] = []
    ours = runner.model(ids, positions, caches, meta, done.append, prefill_ops=runner.prefill_ops)
    assert done == list(range(runner.shape.num_layers))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    for c, r in zip(caches, ref_caches, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("native", [False, True])
@torch.inference_mode()
def test_keeping_rows_drops_only_the_others(arch, runners, native) -> None:
    """keep_rows: the last layer goes on with the kept rows only; those rows' hidden states (and
    every K/V written) are the full step's, within the projections' rounding."""
    runner = runners[arch]
    ids, positions, caches, meta = _mixed_step(runner, seed=3 + len(arch))
    full_caches = [c.clone() for c in caches]
    full = runner.model(ids, positions, full_caches, meta, prefill_ops=runner.prefill_ops)
    keep = torch.tensor([6, 12, 13, 14, 15])  # the chunks' last rows and the decodes (16 rows in all)
    ours = runner.model(ids, positions, caches, meta, prefill_ops=runner.prefill_ops, keep_rows=keep,
                        keep_native=native)
    assert ours.shape == (keep.numel(), runner.shape.hidden_size)
    torch.testing.assert_close(ours, full[keep], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(caches, full_caches, strict=True))


@torch.inference_mode()
def test_results_do_not_depend_on_the_thread_count(runners) -> None:
    runner = runners["qwen3"]
    outs = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ids, positions, caches, meta = _mixed_step(runner, seed=5)
            outs.append((runner.model(ids, positions, caches, meta, prefill_ops=runner.prefill_ops), caches))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1], strict=True))


def test_buffers_grow_and_are_reused(runners) -> None:
    ops = PrefillOps(runners["llama"].model)
    a = ops.buffers(10)
    b = ops.buffers(4)
    assert [v.data_ptr() for v in a] != [v.data_ptr() for v in b] and b[0].data_ptr() == a[0].data_ptr()
    assert all(v.is_contiguous() and v.shape[0] == 4 for v in b)
    c = ops.buffers(50)
    assert c[0].shape == (50, runners["llama"].shape.hidden_size) and ops.buffers(50)[4].data_ptr() == c[4].data_ptr()


def test_the_runner_uses_them_for_every_step_not_fused(tiny_models) -> None:
    """auto: native on a float32 CPU model, for prefill, mixed and 33-sequence steps, not for fused
    decode steps; torch: never; native where it cannot run: an error; bf16 under auto: torch."""
    folder = str(tiny_models["llama"])
    runner = ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=80), dtype="float32")
    assert runner.prefill_ops is not None
    calls: list[int] = []
    forward = runner.prefill_ops.forward
    runner.prefill_ops.forward = lambda *a, **k: (calls.append(a[1].shape[0]), forward(*a, **k))[1]  # type: ignore[method-assign]
    prefill = Request("p", [5] * 3, max_tokens=2, arrival_time=0.0, block_ids=[79])
    for out, used in ((_decode_step(1), False), (_decode_step(32), False), (_decode_step(33), True),
                      (SchedulerOutput([ScheduledChunk(prefill, 3, sample=True)]), True),
                      (SchedulerOutput([*_decode_step(2).chunks, ScheduledChunk(prefill, 3, sample=True)]), True)):
        calls.clear()
        runner.execute(out)
        assert calls == ([sum(c.num_tokens for c in out.chunks)] if used else []), out
    assert ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=8, prefill_ops="torch"),
                       dtype="float32").prefill_ops is None
    assert ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=8), dtype="bfloat16").prefill_ops is None
    with pytest.raises(RuntimeError, match="prefill_ops = native, but .*float32 only"):
        ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=8, prefill_ops="native"), dtype="bfloat16")
    assert not prefill_ops.choose("auto", torch.device("cuda"), torch.float32, 64)


def test_no_working_compiler_falls_back(monkeypatch) -> None:
    monkeypatch.setenv("CC", "false")
    prefill_ops.library.cache_clear()
    try:
        assert prefill_ops.choose("auto", CPU, torch.float32, 64) is False
        with pytest.raises(RuntimeError, match="false failed"):
            prefill_ops.choose("native", CPU, torch.float32, 64)
    finally:
        monkeypatch.undo()
        prefill_ops.library.cache_clear()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_greedy_tokens_native_equal_torch_and_transformers(arch, tiny_models) -> None:
    """A 12-token budget: prompts split across steps, prefill chunks sharing steps with decodes.
    Native and torch element-wise ops give the same greedy tokens, and transformers' own."""
    from transformers import AutoConfig

    prompts = _prompts(AutoConfig.from_pretrained(str(tiny_models[arch])).vocab_size, seed=2)
    tokens, mixed, pruned = {}, 0, 0
    for setting in ("native", "torch"):
        llm = LLM(str(tiny_models[arch]), dtype="float32", device="cpu", prefill_ops=setting,
                  max_num_batched_tokens=12, block_size=BS)
        if setting == "native":
            assert llm.runner.prefill_ops is not None
            forward = llm.runner.prefill_ops.forward

            def seen(backbone, x, caches, meta, done=None, *keep, forward=forward):  # type: ignore[no-untyped-def]
                nonlocal mixed, pruned
                mixed += bool(meta.prefill) and meta.native is not None  # prefill chunks + decodes
                pruned += bool(keep) and keep[0] is not None
                return forward(backbone, x, caches, meta, done, *keep)

            llm.runner.prefill_ops.forward = seen  # type: ignore[method-assign]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
        tokens[setting] = [o.outputs[0].token_ids for o in outs]
    assert mixed > 0 and pruned > 0
    assert tokens["native"] == tokens["torch"]
    assert tokens["native"] == _hf_greedy(tiny_models[arch], prompts)
