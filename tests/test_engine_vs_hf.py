"""Greedy output of pdserve's engine equals Hugging Face transformers, token for token."""

from __future__ import annotations

import os
import random

import pytest
import torch

from pdserve import LLM, SamplingParams

ARCH_NAMES = ["llama", "qwen2", "qwen3", "mistral"]
MAX_TOKENS = 12
DEVICE = os.environ.get("PDSERVE_TEST_DEVICE", "cpu")  # e.g. cuda, on a GPU machine


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [3, 17, 40, 9, 64, 1, 33]
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def _hf_greedy(folder, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             do_sample=False, pad_token_id=0)
        new = gen[0, len(p):].tolist()
        if 2 in new:  # stop at EOS, as pdserve does
            new = new[: new.index(2) + 1]
        outs.append(new)
    return outs


def _ours(folder, prompts, **kw) -> list[list[int]]:
    llm = LLM(str(folder), dtype="float32", device=DEVICE, **kw)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert llm.block_manager.num_used_blocks == 0, "blocks leaked"
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def expected(tiny_models) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    res = {}
    for arch in ARCH_NAMES:
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(str(tiny_models[arch])).vocab_size
        prompts = _prompts(vocab)
        res[arch] = (prompts, _hf_greedy(tiny_models[arch], prompts))
    return res


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_batch_matches_transformers(arch, tiny_models, expected):
    prompts, want = expected[arch]
    assert _ours(tiny_models[arch], prompts) == want


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_chunked_prefill_small_blocks_match(arch, tiny_models, expected):
    prompts, want = expected[arch]
    got = _ours(tiny_models[arch], prompts, block_size=4, max_num_batched_tokens=16, max_num_seqs=3)
    assert got == want


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_preemption_with_tiny_cache_matches(arch, tiny_models, expected):
    prompts, want = expected[arch]
    llm = LLM(str(tiny_models[arch]), dtype="float32", device=DEVICE, block_size=4, num_blocks=24,
              max_num_batched_tokens=32)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.scheduler.num_preemptions > 0, "the cache was meant to be too small to avoid preemption"
    assert llm.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_cache_hits_match(arch, tiny_models, expected):
    prompts, want = expected[arch]
    llm = LLM(str(tiny_models[arch]), dtype="float32", device=DEVICE, block_size=4)
    first = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    again = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert [o.outputs[0].token_ids for o in first] == want
    assert [o.outputs[0].token_ids for o in again] == want
    assert sum(o.num_cached_tokens for o in again) > 0, "second pass should hit the prefix cache"
    assert llm.block_manager.num_used_blocks == 0
