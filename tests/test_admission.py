"""Admission (pdserve/sched/admission.py): a request the policies could never finish is refused up
front, offline and in every role; one that can finish at the very edge is admitted and finishes.

The policy tests step the pure policies by hand (no model): they show each limit is exact, that a
request one token past it never finishes (the hang the check prevents), and one at it does.
"""

from __future__ import annotations

import pytest

from pdserve.config.engine import DecodeConfig, PrefillConfig, SchedulerConfig
from pdserve.sched.admission import Holds, Limits, admission_error, limits_for, max_sequence_tokens
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.colocated import ColocatedScheduler
from pdserve.sched.decode import DecodeScheduler
from pdserve.sched.prefill import PrefillBatcher
from pdserve.sched.request import Request

BS, NB = 16, 4  # a 64-token KV cache
TOKEN = 7  # what the hand-stepped "model" samples; never a stop token here


def _req(p: int, max_tokens: int, rid: str = "r") -> Request:
    return Request(rid, [3] * p, max_tokens, arrival_time=0.0)


def _colocated(chunked: bool = True, budget: int = 512) -> ColocatedScheduler:
    return ColocatedScheduler(SchedulerConfig(budget, 8, chunked), BlockManager(NB, BS))


def _run(policy: ColocatedScheduler, req: Request, steps: int = 500) -> bool:
    """Step the policy until `req` finishes (True) or `steps` run out (False: it never would)."""
    policy.add_request(req, 0.0)
    for i in range(steps):
        out = policy.schedule(float(i))
        sampled = {c.request.request_id: TOKEN for c in out.chunks if c.sample}
        if any(r is req for r in policy.update(out, sampled, float(i))):
            return True
    return False


# ---- the pure check -------------------------------------------------------------------------

def test_limits_of_each_policy():
    col = limits_for(_colocated(), 512, 300)
    assert col == Limits(512, NB * BS, Holds.SEQUENCE, None, 300)
    assert limits_for(_colocated(chunked=False, budget=100), 512).step_tokens == 100
    dec = DecodeScheduler(DecodeConfig(max_batch_size=4, max_num_seqs=8, min_batch_size=1), BlockManager(NB, BS))
    assert limits_for(dec, 512) == Limits(512, NB * BS, Holds.SEQUENCE)
    assert limits_for(dec, 512).for_reservation().holds is Holds.RESERVATION
    pre = PrefillBatcher(PrefillConfig(max_batch_tokens=8), BlockManager(NB, BS))
    assert limits_for(pre, 512) == Limits(512, NB * BS, Holds.PROMPT)  # a batch always takes its first prompt


@pytest.mark.parametrize("prompt,max_tokens,limits,words", [
    ([], 4, Limits(512, 64), "empty"),
    ([1], 0, Limits(512, 64), "max_tokens"),
    ([1, 400], 1, Limits(512, 64, vocab_size=300), "token id 400"),
    ([1, -1], 1, Limits(512, 64, vocab_size=300), "token id -1"),
    ([1] * 10, 503, Limits(512, 10_000), "maximum context length of 512"),
    ([1] * 60, 6, Limits(512, 64), "65 tokens"),  # 60 + 6 - 1 > 64
    ([1] * 64, 1, Limits(512, 64, Holds.RESERVATION), "65 tokens"),  # reserve holds prompt + first token
    ([1] * 65, 1, Limits(512, 64, Holds.PROMPT), "KV for 65"),
    ([1] * 60, 6, Limits(512, 1000, step_tokens=64), "max_num_batched_tokens (64)"),
])
def test_refused_with_the_reason(prompt, max_tokens, limits, words):
    why = admission_error(prompt, max_tokens, limits)
    assert why is not None and words in why, why


@pytest.mark.parametrize("prompt,max_tokens,limits", [
    ([1], 1, Limits(512, 64)),
    ([1] * 60, 5, Limits(512, 64)),  # 60 + 5 - 1 == 64: exactly the cache
    ([1] * 63, 1, Limits(512, 64, Holds.RESERVATION)),
    ([1] * 64, 400, Limits(512, 64, Holds.PROMPT)),  # a prefill worker holds the prompt only
    ([1] * 10, 502, Limits(512, 10_000)),  # exactly the context
    ([1] * 60, 5, Limits(512, 1000, step_tokens=64)),
    ([299], 1, Limits(512, 64, vocab_size=300)),
])
def test_admitted_at_the_edge(prompt, max_tokens, limits):
    assert admission_error(prompt, max_tokens, limits) is None


@pytest.mark.parametrize("limits,most", [
    (Limits(512, 64), 65), (Limits(512, 64, Holds.RESERVATION), 65), (Limits(512, 64, Holds.PROMPT), 512),
    (Limits(512, 10_000), 512), (Limits(512, 1000, step_tokens=100), 101),
])
def test_max_sequence_tokens_is_the_edge(limits, most):
    assert max_sequence_tokens(limits) == most
    p = 10
    assert admission_error([1] * p, most - p, limits) is None
    if most < limits.max_model_len or limits.holds is not Holds.PROMPT:
        assert admission_error([1] * p, most - p + 1, limits) is not None


# ---- the limits are exact: the policies finish what is admitted, never what is refused -------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("p,max_tokens", [(60, 5), (60, 6), (1, 64), (1, 65), (64, 1), (65, 1)])
def test_colocated_finishes_exactly_what_is_admitted(p, max_tokens):
    policy = _colocated()
    admitted = admission_error([3] * p, max_tokens, limits_for(policy, 10_000)) is None
    assert _run(policy, _req(p, max_tokens)) is admitted


@pytest.mark.timeout(60)
@pytest.mark.parametrize("p,max_tokens", [(30, 3), (30, 4)])
def test_unchunked_colocated_finishes_exactly_what_is_admitted(p, max_tokens):
    # With chunked prefill off a preempted request is recomputed in one step: prompt + tokens so far
    # (all of it when its blocks are no longer cached: the worst case, made certain here).
    policy = ColocatedScheduler(SchedulerConfig(32, 8, False), BlockManager(64, BS, enable_prefix_caching=False))
    admitted = admission_error([3] * p, max_tokens, limits_for(policy, 10_000)) is None
    other = _req(8, 40, "other")  # runs alongside and takes no more than its share
    policy.add_request(other, 0.0)
    assert admitted is (p + max_tokens - 1 <= 32)
    req = _req(p, max_tokens)
    policy.add_request(req, 0.0)
    # Force the worst case: preempt `req` just before its last step; it must come back whole.
    finished = False
    for i in range(500):
        if len(req.output_token_ids) == max_tokens - 1 and req in policy.running and not req.num_preemptions:
            policy._preempt(req)
        out = policy.schedule(float(i))
        sampled = {c.request.request_id: TOKEN for c in out.chunks if c.sample}
        if any(r is req for r in policy.update(out, sampled, float(i))):
            finished = True
            break
    assert finished is admitted


@pytest.mark.parametrize("p", [63, 64])
def test_decode_reservation_exactly_what_is_admitted(p):
    policy = DecodeScheduler(DecodeConfig(max_batch_size=4, max_num_seqs=8, min_batch_size=1), BlockManager(NB, BS))
    admitted = admission_error([3] * p, 1, limits_for(policy, 10_000).for_reservation()) is None
    assert policy.reserve(_req(p, 1), 0.0) is admitted  # refused now and on every retry


@pytest.mark.parametrize("p", [64, 65])
def test_prefill_exactly_what_is_admitted(p):
    policy = PrefillBatcher(PrefillConfig(max_batch_tokens=8, max_wait_ms=0), BlockManager(NB, BS))
    admitted = admission_error([3] * p, 100, limits_for(policy, 10_000)) is None
    policy.add_request(_req(p, 100), 0.0)
    started = any(policy.schedule(float(i)).chunks for i in range(50))
    assert started is admitted


# ---- the offline API ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(tiny_models):  # type: ignore[no-untyped-def]
    import pdserve

    return pdserve.LLM(str(tiny_models["llama"]), num_blocks=NB, block_size=BS)


@pytest.mark.timeout(60)
def test_offline_empty_prompt_names_its_index(llm):
    import pdserve

    greedy = pdserve.SamplingParams(max_tokens=3, temperature=0)
    with pytest.raises(ValueError, match="prompt 0: the prompt is empty"):
        llm.generate([[]], greedy)
    with pytest.raises(ValueError, match="prompt 0: the prompt is empty"):
        llm.generate("", greedy)  # text the tokenizer turns into no ids at all
    with pytest.raises(ValueError, match="prompt 1: the prompt is empty"):
        llm.generate([[5, 6], []], greedy)
    # Nothing of the refused call stays queued: the next call runs just its own prompt.
    want = llm.generate([[5, 6]], greedy)[0].outputs[0].token_ids
    assert len(want) == 3
    assert [o.outputs[0].token_ids for o in llm.generate([[5, 6], [5, 6]], greedy)] == [want, want]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("prompt,max_tokens,words", [
    ([5] * 60, 6, "whole KV cache"),  # 65 tokens of KV; the cache holds 64
    ([5] * 10, 503, "maximum context length of 512"),
    ([5, 10**6], 2, "outside the vocabulary"),
])
def test_offline_refuses_what_cannot_finish(llm, prompt, max_tokens, words):
    import pdserve

    with pytest.raises(ValueError, match=f"prompt 1: .*{words}"):
        llm.generate([[5, 6], prompt], [pdserve.SamplingParams(max_tokens=2, temperature=0),
                                        pdserve.SamplingParams(max_tokens=max_tokens, temperature=0)])


@pytest.mark.timeout(120)
def test_offline_runs_what_just_fits(llm):
    import pdserve

    out = llm.generate([[5] * 60], pdserve.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5 and out[0].outputs[0].finish_reason == "length"
