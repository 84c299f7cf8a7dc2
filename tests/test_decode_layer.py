"""The fused CPU decoder layer (pdserve/model/decode_layer.c) against the per-op path it replaces,
its batch invariance, the runner's choice of it, and greedy tokens through it against transformers."""

from __future__ import annotations

import random
import time

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.config.engine import CacheConfig
from pdserve.engine.model_runner import ModelRunner, step_metadata
from pdserve.model import decode_layer
from pdserve.model.decode_layer import FusedDecode
from pdserve.sched.output import ScheduledChunk, SchedulerOutput
from pdserve.sched.request import Request
from tests.test_engine_paths import BS, _shuffled_tables
from tests.test_engine_vs_hf import ARCH_NAMES, MAX_TOKENS, _hf_greedy, _prompts

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(isinstance(decode_layer.library(), str), reason="no C compiler here")
# Mixed contexts: partial last blocks (BS = 4), one block exactly, one token, one of 23 blocks.
CTX = [38, 1, 17, 16, 5, 90, 4, 2]


@pytest.fixture(scope="module")
def runners(tiny_models) -> dict[str, ModelRunner]:
    cache = CacheConfig(block_size=BS, num_blocks=64, decode_attention="native", decode_linear="native",
                        decode_layer="torch")
    return {arch: ModelRunner(str(tiny_models[arch]), cache, dtype="float32") for arch in ARCH_NAMES}


def _step(runner: ModelRunner, ctx: list[int], seed: int):
    """A random hidden state [T, hidden], a random cache per layer, and the step's metadata for
    decode sequences of contexts `ctx`, their blocks shuffled through the cache."""
    g = torch.Generator().manual_seed(seed)
    s = runner.shape
    tables = _shuffled_tables(ctx, random.Random(seed), spare=5)
    caches = [torch.randn(2, 64, BS, s.num_kv_heads, s.head_dim, generator=g) for _ in range(s.num_layers)]
    x = torch.randn(len(ctx), s.hidden_size, generator=g)
    spans = [(t, c - 1, 1) for t, c in zip(tables, ctx, strict=True)]
    meta = step_metadata(spans, BS, CPU, native=True)
    positions = torch.tensor([c - 1 for c in ctx])
    cos, sin = runner.model.rope.table(positions, max(ctx))
    meta.cos, meta.sin, meta.native_linear = cos, sin, True
    return x, caches, meta


def _fused(runner: ModelRunner, x: torch.Tensor, caches: list[torch.Tensor], meta, layers: int) -> torch.Tensor:
    f = FusedDecode(runner.model, caches)
    x = x.clone()
    f.start(x, meta.slot_mapping, meta.cos, meta.sin, meta.native)
    for i in range(layers):
        f.layer(i, caches[i])
    return x


@needs_kernel
@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("threads", [1, 2])
@torch.inference_mode()
def test_fused_layers_match_the_per_op_path(arch, batch, threads, runners) -> None:
    """Both layers of each architecture (GQA 2:1 to 4:1, Qwen2's bias, Qwen3's q/k norm, odd
    head_dims): hidden states and the K/V written, against the per-op native path."""
    runner = runners[arch]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, caches, meta = _step(runner, CTX[:batch] if batch > 1 else [CTX[5]], seed=batch)
        ref_caches = [c.clone() for c in caches]
        ref = x
        for i, layer in enumerate(runner.model.model.layers):
            ref = layer(ref, ref_caches[i], meta)
        ours = _fused(runner, x, caches, meta, len(caches))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for c, r in zip(caches, ref_caches, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@torch.inference_mode()
def test_a_row_is_bitwise_the_same_alone_and_in_a_batch_of_8(arch, runners) -> None:
    """Two threads: at batch 1 each KV head is an attention task of its own, at 8 whole rows are."""
    runner = runners[arch]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, caches, meta = _step(runner, CTX, seed=3)
        batch = _fused(runner, x, [c.clone() for c in caches], meta, len(caches))
        for j in (0, 5, 7):
            one = step_metadata([(meta.native.tables[j].tolist(), CTX[j] - 1, 1)], BS, CPU, native=True)
            one.cos, one.sin = meta.cos[j : j + 1].contiguous(), meta.sin[j : j + 1].contiguous()
            alone = _fused(runner, x[j : j + 1], [c.clone() for c in caches], one, len(caches))
            assert torch.equal(alone[0], batch[j]), f"row {j}"
    finally:
        torch.set_num_threads(before)


@needs_kernel
@torch.inference_mode()
def test_phase_timers_add_up_to_the_layer_calls(runners) -> None:
    """The bench's per-phase breakdown (decode_layer.c's own timers): every phase timed, their sum
    within the calls' wall time, nothing written while off."""
    runner = runners["qwen3"]
    x, caches, meta = _step(runner, CTX, seed=4)
    f = FusedDecode(runner.model, caches)
    f.start(x, meta.slot_mapping, meta.cos, meta.sin, meta.native)
    f.layer(0, caches[0])  # untimed
    f.time_phases(True)
    t = time.perf_counter()
    for i in range(len(caches)):
        f.layer(i, caches[i])
    wall = time.perf_counter() - t
    phases = f.phase_seconds()
    assert list(phases) == list(decode_layer.PHASES) and all(v > 0 for v in phases.values()), phases
    assert sum(phases.values()) <= wall
    f.time_phases(False)
    with pytest.raises(AssertionError):
        f.phase_seconds()


def _decode_step(n: int) -> SchedulerOutput:
    """n sequences of 6 tokens (5 prompt, 1 output), the last one to compute."""
    chunks = []
    for i in range(n):
        req = Request(f"r{i}", [3 + i] * 5, max_tokens=4, arrival_time=0.0, block_ids=[2 * i, 2 * i + 1])
        req.output_token_ids, req.num_computed_tokens = [7], 5
        chunks.append(ScheduledChunk(req, 1, sample=True))
    return SchedulerOutput(chunks)


@needs_kernel
def test_the_runner_fuses_decode_steps_only(tiny_models) -> None:
    """native: fused at 1-32 sequences (not 33+, not a step with a prefill chunk); auto: 1-32 (none
    with decode_linear torch); torch: never; native without the native
    attention: an error."""
    folder = str(tiny_models["llama"])
    runner = ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=80, decode_layer="native"), dtype="float32")
    assert runner.layer_rows == range(1, 33) and runner.fused is not None
    calls = []
    layer = runner.fused.layer
    runner.fused.layer = lambda i, c: (calls.append(i), layer(i, c))  # type: ignore[method-assign]
    for n, fused in ((1, True), (8, True), (32, True), (33, False)):
        calls.clear()
        runner.execute(_decode_step(n))
        assert calls == ([0, 1] if fused else []), n
    done: list[int] = []  # the KV streaming hook still runs after each fused layer
    calls.clear()
    runner.execute(_decode_step(1), layer_done=done.append)
    assert calls == [0, 1] and done == [0, 1]
    prefill = Request("p", [5] * 3, max_tokens=2, arrival_time=0.0, block_ids=[79])
    calls.clear()
    runner.execute(SchedulerOutput([*_decode_step(2).chunks, ScheduledChunk(prefill, 3, sample=True)]))
    assert calls == []
    auto = ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=80), dtype="float32")
    assert auto.layer_rows == range(1, 33) and auto.fused is not None
    # decode_linear native (batch-invariant steps): every decode step fused, one arithmetic for all
    invariant = ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=80, decode_linear="native"), dtype="float32")
    assert invariant.layer_rows == range(1, 33)
    assert not ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=80, decode_linear="torch"),
                           dtype="float32").layer_rows
    off = ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=80, decode_layer="torch"), dtype="float32")
    assert off.fused is None and not off.layer_rows
    with pytest.raises(RuntimeError, match="decode_layer = native"):
        ModelRunner(folder, CacheConfig(block_size=BS, num_blocks=80, decode_layer="native",
                                        decode_attention="torch"), dtype="float32")


@needs_kernel
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_greedy_tokens_through_the_fused_layer_match_transformers(arch, tiny_models) -> None:
    """decode_layer = native: every decode step (batches 7 down to 1) runs fused."""
    from transformers import AutoConfig

    prompts = _prompts(AutoConfig.from_pretrained(str(tiny_models[arch])).vocab_size, seed=1)
    llm = LLM(str(tiny_models[arch]), dtype="float32", device="cpu", decode_layer="native")
    assert llm.runner.fused is not None
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert [o.outputs[0].token_ids for o in outs] == _hf_greedy(tiny_models[arch], prompts)
