"""The batched sampler's processors held to references: penalties and logit bias token for token
against transformers' logits processors on the same weights, logprobs against transformers'
log-softmax, min-p against the exact distribution, structured outputs that parse and validate."""

from __future__ import annotations

import json
import math
import random
import re

import jsonschema
import pytest
import torch

from pdserve.engine.grammar import GuidedSpec
from pdserve.engine.llm import LLM
from pdserve.engine.sampler import Row, SamplingParams, sample_rows

MAX_TOKENS = 16
LOGPROB_TOL = 2e-4  # float32, two implementations' kernels: absolute, on log-probabilities
PENALTIES = [
    {"repetition_penalty": 1.8},
    {"frequency_penalty": 1.5, "presence_penalty": 0.7},
    {"presence_penalty": -1.0, "logit_bias": {7: 4.0, 11: -100.0}},
    {"repetition_penalty": 0.7, "frequency_penalty": -0.5, "logit_bias": {20: 2.0}},
]
# Bounded, so that even random weights finish it well within max_tokens.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 5},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}}


def hf_reference(folder, prompts: list[list[int]], params: dict, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """Greedy generation in transformers with its own processors for bias and repetition (HF's
    semantics) and presence/frequency on the output tokens (OpenAI's), in vLLM's order."""
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )

    class OpenAIPenalties(LogitsProcessor):
        def __init__(self, n_prompt: int) -> None:
            self.n_prompt = n_prompt

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            for row in range(scores.shape[0]):
                for tok, count in zip(*torch.unique(input_ids[row, self.n_prompt:], return_counts=True), strict=True):
                    scores[row, tok] -= params.get("frequency_penalty", 0) * count + params.get("presence_penalty", 0)
            return scores

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        procs = []
        if params.get("logit_bias"):
            procs.append(SequenceBiasLogitsProcessor({(t,): b for t, b in params["logit_bias"].items()}))
        if params.get("repetition_penalty", 1) != 1:
            procs.append(RepetitionPenaltyLogitsProcessor(params["repetition_penalty"]))
        procs.append(OpenAIPenalties(len(p)))
        ids = torch.tensor([p])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=0, logits_processor=LogitsProcessorList(procs))
        new = gen[0, len(p):].tolist()
        outs.append(new[: new.index(2) + 1] if 2 in new else new)
    return outs


def hf_logprobs(folder, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), vocab]: transformers' log-softmax at each output position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(output) - 1], dim=-1)


def prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.choice([2, 9, 30]))] for _ in range(n)]


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:  # type: ignore[no-untyped-def]
    return LLM(str(tiny_models["llama"]), kv_cache_memory_gb=0.05)


@pytest.mark.parametrize("params", PENALTIES, ids=lambda p: ",".join(p))
def test_penalties_equal_transformers_processors(llm: LLM, tiny_models, params: dict) -> None:
    ps = prompts(4, 300, seed=len(params))
    got = [o.outputs[0].token_ids for o in llm.generate(ps, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                           **params))]
    assert got == hf_reference(tiny_models["llama"], ps, params)
    plain = [o.outputs[0].token_ids for o in llm.generate(ps, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))]
    assert got != plain  # the penalties changed something: the test can fail


def test_logprobs_equal_transformers_log_softmax(llm: LLM, tiny_models) -> None:
    p = [5, 17, 99, 4, 250, 31]
    out = llm.generate(p, SamplingParams(max_tokens=12, temperature=1.0, seed=9, logprobs=5, ignore_eos=True))[0]
    c = out.outputs[0]
    ref = hf_logprobs(tiny_models["llama"], p, c.token_ids)
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) == 12
    for i, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        assert abs(lp.logprob - ref[i, tok].item()) < LOGPROB_TOL
        top = ref[i].topk(5)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert max(abs(v - w) for (_, v), w in zip(lp.top, top.values.tolist(), strict=True)) < LOGPROB_TOL


def test_logprobs_zero_gives_the_sampled_token_only() -> None:
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(1))
    out = sample_rows(logits, [Row(SamplingParams(temperature=0, logprobs=0), 0)] * 3)
    assert all(lp is not None and lp.top == [] for lp in out.logprobs)
    want = torch.log_softmax(logits, -1).max(-1).values.tolist()
    assert [lp.logprob for lp in out.logprobs] == pytest.approx(want)  # type: ignore[union-attr]


def test_batched_rows_with_penalties_ignore_their_neighbours() -> None:
    """A row's token depends on its own logits, history and seed only, not on the batch around it."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, generator=g)
    rows = [Row(SamplingParams(temperature=t, seed=i, repetition_penalty=r, frequency_penalty=f, min_p=mp,
                               logit_bias={i: 2.0}), step=i, output_ids=[1, 2, 2, i], context_ids=[0, 1, 2, 2, i])
            for i, (t, r, f, mp) in enumerate([(0, 1.5, 0, 0), (1, 1, 1, 0.1), (0.7, 2, 0.5, 0), (1.2, 1, 0, 0.3),
                                               (1, 1.1, -1, 0), (0, 1, 2, 0)])]
    together = sample_rows(logits, rows).tokens
    for i in range(6):
        assert sample_rows(logits[[i]], [rows[i]]).tokens == [together[i]]


@pytest.mark.parametrize("min_p", [0.2, 0.5])
def test_min_p_follows_the_exact_distribution(min_p: float) -> None:
    from tests.test_sampling import CHI2_999, LOGITS

    draws = 3000
    tokens = sample_rows(LOGITS.repeat(draws, 1), [Row(SamplingParams(min_p=min_p, seed=5), i)
                                                   for i in range(draws)]).tokens
    w = [math.exp(x) for x in LOGITS.tolist()]
    keep = [x if x >= min_p * max(w) else 0.0 for x in w]
    want = [x / sum(keep) for x in keep]
    got = [tokens.count(i) for i in range(len(w))]
    support = [i for i, p in enumerate(want) if p > 0]
    assert 1 < len(support) < len(w)
    assert all(got[i] == 0 for i in range(len(w)) if want[i] == 0)
    chi2 = sum((got[i] - draws * want[i]) ** 2 / (draws * want[i]) for i in support)
    assert chi2 < CHI2_999[len(support) - 1], (got, want)


@pytest.mark.slow  # about 20 s of CPU: 50 sequences of the 27M-parameter demo model
def test_json_schema_validates_for_50_prompts_on_the_demo_model() -> None:
    llm = LLM("demo", kv_cache_memory_gb=0.1)
    ps = prompts(50, 4000, seed=1)
    spec = GuidedSpec("json_schema", json.dumps(SCHEMA))
    outs = llm.generate(ps, [SamplingParams(max_tokens=60, temperature=1.0, seed=i, guided=spec) for i in range(50)])
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len({o.outputs[0].text for o in outs}) > 25  # sampled, not one forced string


def test_regex_choice_and_json_object(llm: LLM) -> None:
    ps = prompts(6, 300, seed=4)
    for spec, check in [(GuidedSpec("regex", r"[a-z]{2,5}-[0-9]{2}"), lambda t: re.fullmatch(r"[a-z]{2,5}-[0-9]{2}", t)),
                        (GuidedSpec("choice", json.dumps(["red", "green", "blue"])), lambda t: t in ("red", "green", "blue")),
                        (GuidedSpec("json_object"), lambda t: isinstance(json.loads(t), dict))]:
        outs = llm.generate(ps, SamplingParams(max_tokens=200, temperature=0.8, seed=1, guided=spec))
        for o in outs:
            assert o.outputs[0].finish_reason == "stop" and check(o.outputs[0].text), (spec, o.outputs[0].text)
    free = llm.generate(ps, SamplingParams(max_tokens=12, temperature=0.8, seed=1))
    assert not all(re.fullmatch(r"[a-z]{2,5}-[0-9]{2}", o.outputs[0].text) for o in free)


def test_a_resumed_guided_request_rebuilds_its_grammar(llm: LLM) -> None:
    """Resumed at k (its first k tokens re-prefilled, output_offset=k), a seeded guided request
    continues exactly: the grammar state comes back from the tokens already output."""
    p = [5, 17, 99, 4]
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=21, guided=GuidedSpec("json_schema", json.dumps(SCHEMA)))
    full = llm.generate(p, params)[0].outputs[0]
    for k in (1, 7):
        rest = llm.generate(p + full.token_ids[:k], SamplingParams(**{**params.__dict__, "max_tokens": 60 - k,
                                                                       "output_offset": k}))[0].outputs[0]
        assert full.token_ids[:k] + rest.token_ids == full.token_ids
    jsonschema.validate(json.loads(full.text), SCHEMA)


def test_prompt_logprobs_equal_transformers_even_with_the_prefix_cached(llm: LLM, tiny_models) -> None:
    """Every prompt position's log-probability, computed by the prefill (chunked or not); a cached
    prefix does not stand in for positions whose logits are needed."""
    p = [(13 * j) % 290 + 3 for j in range(40)]
    llm.generate(p, SamplingParams(max_tokens=2, temperature=0))  # its blocks now in the prefix cache
    out = llm.generate(p, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))[0]
    ref = torch.log_softmax(hf_logprobs(tiny_models["llama"], p[:1], p[1:]), dim=-1)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(p) - 1
    for i, lp in enumerate(out.prompt_logprobs):
        assert abs(lp.logprob - ref[i, p[i + 1]].item()) < LOGPROB_TOL
        assert [t for t, _ in lp.top] == ref[i].topk(3).indices.tolist()
