"""The engine's fast paths against plain definitions: fused weight loading, paged attention (every
path: fresh causal prefill, chunked prefill over cached blocks, grouped and single decodes), and
chunked prefill in the prefill role."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pdserve.config.engine import CacheConfig, PrefillConfig
from pdserve.engine.core import EngineCore
from pdserve.engine.model_runner import ModelRunner, step_metadata
from pdserve.engine.sampler import SamplingParams
from pdserve.model.attention import group_decodes, paged_attention, reference_attention, write_kv
from pdserve.model.loader import hf_state_dict, load_model
from pdserve.sched import BlockManager, PrefillBatcher

ARCH_NAMES = ["llama", "qwen2", "qwen3", "mistral"]


# ---- fused loading ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_fused_weights_are_the_checkpoint(arch, tiny_models) -> None:
    """Every checkpoint tensor sits, unchanged, in its (fused) parameter; the fused projections
    give the outputs of the separate ones, biases included."""
    from safetensors.torch import load_file

    folder = tiny_models[arch]
    net, shape = load_model(str(folder), dtype="float32")
    ckpt = load_file(str(folder / "model.safetensors"))
    ours = hf_state_dict(net)
    if shape.tie_word_embeddings:
        ckpt.pop("lm_head.weight", None)
    assert set(ours) == set(ckpt)
    for name, t in ckpt.items():
        assert torch.equal(ours[name], t), name
    assert any(n.endswith("q_proj.bias") for n in ckpt) == (arch == "qwen2")
    x = torch.randn(5, shape.hidden_size)
    attn, mlp = net.model.layers[0].self_attn, net.model.layers[0].mlp
    q, k, v = attn.qkv_proj(x).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    for got, part in [(q, "q_proj"), (k, "k_proj"), (v, "v_proj")]:
        want = F.linear(x, ckpt[f"model.layers.0.self_attn.{part}.weight"],
                        ckpt.get(f"model.layers.0.self_attn.{part}.bias"))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    torch.testing.assert_close(gate, F.linear(x, ckpt["model.layers.0.mlp.gate_proj.weight"]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(up, F.linear(x, ckpt["model.layers.0.mlp.up_proj.weight"]), rtol=1e-6, atol=1e-6)


def test_dummy_weights_do_not_depend_on_fusion() -> None:
    """Seeded dummy weights are drawn per HF tensor in HF order: the values a checkpoint of the
    unfused model would hold (q, k, v each N(0, 0.02) from the running generator)."""
    net, _ = load_model("demo", seed=3)
    sd = hf_state_dict(net)
    gen = torch.Generator().manual_seed(3)
    first = torch.empty(sd["model.embed_tokens.weight"].shape).normal_(0.0, 0.02, generator=gen)
    assert torch.equal(sd["model.embed_tokens.weight"], first)
    q = torch.empty(sd["model.layers.0.self_attn.q_proj.weight"].shape).normal_(0.0, 0.02, generator=gen)
    k = torch.empty(sd["model.layers.0.self_attn.k_proj.weight"].shape).normal_(0.0, 0.02, generator=gen)
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], q)
    assert torch.equal(sd["model.layers.0.self_attn.k_proj.weight"], k)
    assert net.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32


# ---- attention paths ---------------------------------------------------------------------------------
BS = 4


def _attend(spans: list[tuple[list[int], int, int]], heads: int, kv_heads: int, d: int, seed: int,
            slack: int = 256):
    """Random cache and q/k/v for `spans` ((table, start, n) per sequence); ours and the reference."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 1 + max(b for t, _, _ in spans for b in t)
    cache = torch.randn(2, num_blocks, BS, kv_heads, d, generator=g)
    t = sum(n for _, _, n in spans)
    q = torch.randn(t, heads, d, generator=g)
    k = torch.randn(t, kv_heads, d, generator=g)
    v = torch.randn(t, kv_heads, d, generator=g)
    meta = step_metadata(spans, BS, torch.device("cpu"), decode_slack=slack)
    write_kv(cache, k, v, meta.slot_mapping)
    scale = d**-0.5
    ours = paged_attention(q, k, v, cache, meta, scale)
    ref = reference_attention(q, cache, [s[0] for s in spans], [s[2] for s in spans],
                              [s[1] + s[2] for s in spans], BS, scale)
    return ours, ref, meta


def _shuffled_tables(lengths: list[int], rng: random.Random, spare: int = 3, bs: int = BS) -> list[list[int]]:
    """Block tables for contexts `lengths`, their blocks shuffled through a cache with `spare` more."""
    need = [-(-n // bs) for n in lengths]
    pool = list(range(sum(need) + spare))
    rng.shuffle(pool)
    out, i = [], 0
    for k in need:
        out.append(pool[i : i + k])
        i += k
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (4, 1)])
def test_decode_batch_of_different_lengths(heads, kv_heads) -> None:
    """Single-token queries of one batch, contexts 1..38 (partial last blocks, lengths far enough
    apart to form several groups), blocks shuffled through the cache."""
    rng = random.Random(heads * 10 + kv_heads)
    ctx = [38, 1, 17, 16, 5, 33, 29, 2]
    tables = _shuffled_tables(ctx, rng)
    tables[2] = [50, 51, 52, 53, 54]  # one in place
    spans = [(t, c - 1, 1) for t, c in zip(tables, ctx, strict=True)]
    for slack, n_groups in ((0, 8), (8, 4), (1000, 1)):  # all singles, some groups, one padded group
        ours, ref, meta = _attend(spans, heads, kv_heads, 8, seed=slack, slack=slack)
        runs = [t == list(range(t[0], t[0] + len(t))) for t in tables]  # read in place, alone
        rest = [c for c, r in zip(ctx, runs, strict=True) if not r]
        assert len(meta.decode) == sum(runs) + len(group_decodes(rest, slack))
        assert len(group_decodes(ctx, slack)) == n_groups
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_single_decode_in_place_and_gathered() -> None:
    """One sequence whose blocks are consecutive is read in place; one whose are not is gathered."""
    for table in ([3, 4, 5], [5, 3, 4]):
        ours, ref, meta = _attend([(table, 9, 1)], 4, 2, 8, seed=1)
        assert (meta.decode[0].first_block is not None) == (table == [3, 4, 5])
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start,n", [(0, 11), (4, 7), (5, 8), (7, 1), (12, 4)])
def test_prefill_chunks_against_the_definition(start, n) -> None:
    """A fresh prompt (causal fast path) and later chunks starting on and off block boundaries,
    packed with a decode and another chunk in one step, GQA, shuffled blocks."""
    rng = random.Random(start * 31 + n)
    lengths = [start + n, 10, 6]
    tables = _shuffled_tables(lengths, rng)
    spans = [(tables[0], start, n), (tables[1], 9, 1), (tables[2], 2, 4)]
    ours, ref, meta = _attend(spans, 6, 2, 8, seed=start + n)
    fresh = [c.blocks is None for c in meta.prefill]
    assert fresh == ([start == 0, False] if n > 1 else [False])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_equals_one_pass() -> None:
    """The same 23-token prompt in one fresh chunk, or in chunks of 5 across steps: same outputs."""
    rng = random.Random(7)
    table = _shuffled_tables([23], rng)[0]
    g = torch.Generator().manual_seed(0)
    cache = torch.zeros(2, max(table) + 1, BS, 2, 8)
    q, k, v = torch.randn(23, 4, 8, generator=g), torch.randn(23, 2, 8, generator=g), torch.randn(23, 2, 8, generator=g)
    meta = step_metadata([(table, 0, 23)], BS, torch.device("cpu"))
    write_kv(cache, k, v, meta.slot_mapping)
    whole = paged_attention(q, k, v, cache, meta, 0.3)
    cache2 = torch.zeros_like(cache)
    parts = []
    for s in range(0, 23, 5):
        e = min(23, s + 5)
        meta = step_metadata([(table, s, e - s)], BS, torch.device("cpu"))
        write_kv(cache2, k[s:e], v[s:e], meta.slot_mapping)
        parts.append(paged_attention(q[s:e], k[s:e], v[s:e], cache2, meta, 0.3))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-6)
    assert torch.equal(cache, cache2)


# ---- chunked prefill in the prefill role --------------------------------------------------------------
def _prefill_role(folder, chunk_tokens: int, prompts: list[list[int]]):
    runner = ModelRunner(str(folder), CacheConfig(block_size=BS, num_blocks=256), dtype="float32")
    bm = BlockManager(runner.num_blocks, BS, enable_prefix_caching=False)
    policy = PrefillBatcher(PrefillConfig(max_batch_tokens=64, max_wait_ms=0.0, chunk_tokens=chunk_tokens), bm)
    core = EngineCore(runner, policy, clock=lambda: 0.0)
    layers: list[tuple[str, int]] = []
    core.layer_hook = lambda out, i: layers.extend((c.request.request_id, i) for c in out.chunks if c.sample)
    reqs = [core.make_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=4)) for i, p in enumerate(prompts)]
    for r in reqs:
        core.add(r)
    first: dict[str, int] = {}
    steps = []
    while policy.has_work():
        res = core.step()
        steps.append([(c.request.request_id, c.num_tokens, c.sample) for c in res.output.chunks])
        first.update(res.new_tokens)
    kv = {r.request_id: [c[:, r.block_ids].flatten(1, 2)[:, : r.num_prompt_tokens] for c in runner.kv_caches]
          for r in reqs}
    for r in reqs:
        policy.release(r, 0.0)
    assert bm.num_used_blocks == 0
    return first, kv, steps, layers


def test_prefill_role_chunking_gives_the_same_tokens_and_kv(tiny_models) -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 200) for _ in range(n)] for n in (45, 7, 30)]
    folder = tiny_models["qwen2"]
    one, kv1, steps1, layers1 = _prefill_role(folder, 0, prompts)
    chunked, kv2, steps2, layers2 = _prefill_role(folder, 16, prompts)
    assert len(steps1) < len(steps2)
    assert max(n for s in steps2 for _, n, _ in s) <= 16
    # Only a prompt's last chunk samples; its KV is shipped (layer hook) once, with that chunk.
    assert sum(smp for s in steps2 for _, _, smp in s) == 3
    assert sorted(layers2) == sorted(layers1)
    assert chunked == one
    for rid in kv1:
        for a, b in zip(kv1[rid], kv2[rid], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prefill_batcher_chunks_finish_first_and_abort_frees() -> None:
    """Partly computed prompts are continued before new ones start; an abort mid-prompt frees."""
    from pdserve.sched import Request

    bm = BlockManager(64, BS, enable_prefix_caching=False)
    p = PrefillBatcher(PrefillConfig(max_batch_tokens=20, max_wait_ms=0.0, chunk_tokens=12), bm)
    p.add_request(Request("a", list(range(1, 31)), max_tokens=2, arrival_time=0.0), 0.0)
    out = p.schedule(0.0)
    assert [(c.request.request_id, c.num_tokens, c.sample) for c in out.chunks] == [("a", 12, False)]
    p.update(out, {}, 0.0)
    p.add_request(Request("b", list(range(1, 9)), max_tokens=2, arrival_time=0.0), 0.0)
    out = p.schedule(0.0)
    assert [(c.request.request_id, c.num_tokens, c.sample) for c in out.chunks] == [("a", 12, False), ("b", 8, True)]
    done = p.update(out, {"b": 5}, 0.0)
    assert [r.request_id for r in done] == ["b"]
    assert p.has_work()
    p.abort("a", 0.0)
    p.release(done[0], 0.0)
    assert not p.has_work() and bm.num_used_blocks == 0
