"""The native CPU prefill-attention kernel (pdserve/model/prefill_attention.c) against the naive
definition, its choice against SDPA, and greedy output through the engine against transformers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.config.engine import CacheConfig
from pdserve.engine.model_runner import ModelRunner, step_metadata
from pdserve.model import prefill_attention
from pdserve.model.attention import paged_attention, reference_attention, write_kv
from tests import tiny_models as tiny
from tests.test_engine_paths import _shuffled_tables
from tests.test_engine_vs_hf import MAX_TOKENS, _hf_greedy, _prompts

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(isinstance(prefill_attention.library(), str), reason="no C compiler here")
AVX512 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False

# (first position, new tokens) per chunk of a step, in packing order: fresh prompts (from 0), later
# chunks of split prompts starting inside a block (21, 13, 300), one ending on a block boundary
# (16 + 16), decode rows between them (1 token), a 1-token fresh prompt (packed as a decode row).
SPANS = [(0, 37), (20, 1), (21, 40), (0, 1), (13, 3), (16, 16), (300, 5), (7, 1), (0, 19)]


def _step(spans: list[tuple[int, int]], heads: int, kv_heads: int, d: int, bs: int, seed: int,
          native: bool = True) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Ours (q a strided view of a fused qkv buffer, as in the model) and the reference."""
    rng = random.Random(seed)
    tables = _shuffled_tables([s + n for s, n in spans], rng, bs=bs)
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, 1 + max(max(t) for t in tables), bs, kv_heads, d, generator=g)
    t = sum(n for _, n in spans)
    qkv = torch.randn(t, heads + 2 * kv_heads, d, generator=g)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    full = [(tb, s, n) for tb, (s, n) in zip(tables, spans, strict=True)]
    meta = step_metadata(full, bs, CPU, native=True, native_prefill=native)
    write_kv(cache, k, v, meta.slot_mapping)
    ours = paged_attention(q, k, v, cache, meta, d**-0.5)
    ref = reference_attention(q, cache, tables, [n for _, n in spans], [s + n for s, n in spans], bs, d**-0.5)
    return ours, ref, meta


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,d,bs", [
    (8, 8, 64, 16),    # group 1
    (8, 4, 64, 16),    # group 2: the demo model's shape
    (16, 4, 128, 32),  # group 4, two 16-key chunks per block
    (8, 1, 64, 8),     # group 8, blocks smaller than a 16-key chunk
    (16, 2, 128, 16),  # group 8 at 128
    (6, 2, 24, 16),    # head_dim 24, group 3: the portable scalar path
])
def test_step_against_reference(heads, kv_heads, d, bs) -> None:
    """Fresh and continuing chunks (boundaries inside blocks, partial last blocks, shuffled blocks),
    decode rows in the same step, every row against the float64 definition; the shapes the vector
    path covers take it (on an AVX-512 CPU), the others the scalar one."""
    ours, ref, meta = _step(SPANS, heads, kv_heads, d, bs, seed=d + heads + bs)
    assert meta.native_prefill is not None and meta.native is not None
    assert all(c.blocks is None and c.mask is None for c in meta.prefill)  # no gather index, no mask
    assert meta.native_prefill.chunks.tolist() == [[0, 37, 37], [38, 40, 61], [79, 3, 16], [82, 16, 32],
                                                   [98, 5, 305], [104, 19, 19]]
    assert prefill_attention.vectorised(d, heads // kv_heads) == (AVX512 and d in (64, 128))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("d", [64, 24])
@pytest.mark.parametrize("spans", [SPANS, [(21, 8)]])
def test_result_independent_of_threads(d, spans) -> None:
    """A step's output is bitwise the same at 1 and 2 threads (vector and scalar paths), also where
    a lone short chunk makes the vector path split its KV heads across tasks."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _, _ = _step(spans, 8, 4, d, 16, seed=1)
        torch.set_num_threads(2)
        two, _, _ = _step(spans, 8, 4, d, 16, seed=1)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernel
def test_a_chunk_alone_equals_the_chunk_in_a_step() -> None:
    """The kernel on one chunk of a step equals the kernel on the whole step, bitwise, at those rows."""
    g = torch.Generator().manual_seed(3)
    bs, heads, kv, d = 16, 8, 4, 64
    tables = _shuffled_tables([37, 61, 305], random.Random(3), bs=bs)
    cache = torch.randn(2, 1 + max(max(t) for t in tables), bs, kv, d, generator=g)
    q = torch.randn(37 + 40 + 5, heads, d, generator=g)
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    every = prefill_attention.NativePrefill(torch.tensor([[0, 37, 37], [37, 40, 61], [77, 5, 305]], dtype=torch.int32),
                                            torch.tensor(padded, dtype=torch.int32))
    out = torch.zeros_like(q)
    prefill_attention.prefill_attention(q, out, cache, every, d**-0.5)
    only = prefill_attention.NativePrefill(torch.tensor([[37, 40, 61]], dtype=torch.int32),
                                           torch.tensor([padded[1]], dtype=torch.int32))
    alone = torch.zeros_like(q)
    prefill_attention.prefill_attention(q, alone, cache, only, d**-0.5)
    assert torch.equal(alone[37:77], out[37:77])
    assert not alone[:37].any() and not alone[77:].any()  # it writes its own rows only


@needs_kernel
def test_large_scores_do_not_overflow() -> None:
    """Scores in the thousands: the online softmax's rescaling keeps every exponential in range
    (the tolerance is float32's at values of ~30 and scores of ~2000)."""
    rng = random.Random(4)
    tables = _shuffled_tables([70, 45], rng, bs=16)
    g = torch.Generator().manual_seed(4)
    cache = torch.randn(2, 1 + max(max(t) for t in tables), 16, 4, 64, generator=g) * 30
    q = torch.randn(70 + 12, 8, 64, generator=g) * 30
    spans = [(tables[0], 0, 70), (tables[1], 33, 12)]
    meta = step_metadata(spans, 16, CPU, native_prefill=True)
    ours = paged_attention(q, q[:, :4], q[:, :4], cache, meta, 0.25)
    ref = reference_attention(q, cache, tables, [70, 12], [70, 45], 16, 0.25)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=3e-3)


def test_choice_and_fallbacks(tiny_models) -> None:
    """torch keeps SDPA (gather + mask for a continuing chunk); auto takes the kernel only where its
    vector path applies; native takes it for any supported shape, and is an error on bf16 or cuda."""
    sdpa = step_metadata([([1, 2, 3], 20, 9)], 16, CPU)
    assert sdpa.native_prefill is None and sdpa.prefill[0].blocks is not None and sdpa.prefill[0].mask is not None
    lib_ok = not isinstance(prefill_attention.library(), str)
    assert prefill_attention.choose("auto", CPU, torch.float32, 8, 4, 64) is (lib_ok and AVX512)
    assert prefill_attention.choose("auto", CPU, torch.float32, 6, 2, 12) is False  # scalar path: SDPA under auto
    assert prefill_attention.choose("native", CPU, torch.float32, 6, 2, 12) is lib_ok
    assert prefill_attention.choose("torch", CPU, torch.float32, 8, 4, 64) is False
    assert prefill_attention.choose("auto", torch.device("cuda"), torch.float32, 8, 4, 64) is False
    assert prefill_attention.choose("auto", CPU, torch.bfloat16, 8, 4, 64) is False
    with pytest.raises(RuntimeError, match="float32 only"):
        prefill_attention.choose("native", CPU, torch.bfloat16, 8, 4, 64)
    with pytest.raises(RuntimeError, match="for cpu"):
        prefill_attention.choose("native", torch.device("cuda"), torch.float32, 8, 4, 64)
    folder = str(tiny_models["llama"])
    forced = ModelRunner(folder, CacheConfig(block_size=16, num_blocks=8, prefill_attention="native"), dtype="float32")
    assert forced.native_prefill is lib_ok
    assert ModelRunner(folder, CacheConfig(block_size=16, num_blocks=8), dtype="float32").native_prefill is False


def test_no_working_compiler_falls_back(monkeypatch) -> None:
    """A compiler that fails (here `false`): SDPA under auto, an error under native."""
    monkeypatch.setenv("CC", "false")
    prefill_attention.library.cache_clear()
    try:
        assert prefill_attention.choose("auto", CPU, torch.float32, 8, 4, 64) is False
        with pytest.raises(RuntimeError, match="false failed"):
            prefill_attention.choose("native", CPU, torch.float32, 8, 4, 64)
    finally:
        monkeypatch.undo()
        prefill_attention.library.cache_clear()


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The 4 tiny architectures, and a llama with head_dim 64 (group 2), whose prefill attention
    takes the kernel's vector path (the tiny ones' head dims take its scalar path)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(tiny.ARCHS, "llama_d64", dict(tiny.ARCHS["llama"], hidden_size=128, num_attention_heads=2,
                                                 num_key_value_heads=1))
        wide = tiny.make_tiny_model("llama_d64", tmp_path_factory.mktemp("wide") / "llama_d64")
    return {**tiny_models, "llama_d64": wide}


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "llama_d64"])
def test_greedy_native_equals_sdpa_and_transformers(arch, models) -> None:
    """Prompts split across steps (16 tokens a step, 4-token blocks: chunks start inside blocks,
    share steps with decodes): native and SDPA prefill attention give the same tokens, and both
    those of transformers."""
    from transformers import AutoConfig

    folder = models[arch]
    # The equivalence suite's prompts of 17, 40 and 64 tokens (3, 4 and 5 chunks; transformers'
    # generate costs ~0.3 s a prompt here, the engine runs ~0.2 s).
    prompts = [p for p in _prompts(AutoConfig.from_pretrained(str(folder)).vocab_size) if len(p) in (17, 40, 64)]
    assert len(prompts) == 3
    want = _hf_greedy(folder, prompts)
    got = {}
    for setting in ("native", "torch"):
        llm = LLM(str(folder), dtype="float32", device="cpu", prefill_attention=setting, block_size=4,
                  max_num_batched_tokens=16, max_num_seqs=3)
        assert llm.runner.native_prefill is (setting == "native")
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
        got[setting] = [o.outputs[0].token_ids for o in outs]
    assert got["native"] == got["torch"] == want
