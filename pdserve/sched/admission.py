"""Admission: refuse up front a request that the policies could never finish.

The batchers only ever wait for resources to come back (blocks freed, a step's budget), so a
request that needs more than an instance has *in total* would wait forever, and, at the head of
the queue, hold everyone behind it. `admission_error` is the one check for that, used by the
offline `LLM`, every worker role and (through their refusals) the router. Pure: no torch, no I/O.

What one request can need, by where it runs:
  * the whole sequence (colocated, or a decode worker running the prompt itself): KV for the
    prompt and every output token but the last (the last is sampled, never computed);
  * a decode reservation: KV for the prompt and the first token (what `reserve` allocates), then
    the whole sequence as it decodes;
  * a prefill: KV for the prompt only (the output is decode's).
Without chunked prefill a preempted request is recomputed in one step (prompt + tokens so far),
so the whole sequence must fit one step's token budget, or it could stall for good once preempted.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pdserve.sched.colocated import ColocatedScheduler  # the decode policy is one too
from pdserve.sched.prefill import PrefillBatcher


class Holds(enum.Enum):
    """Which tokens of a request need KV blocks on this instance."""

    SEQUENCE = "sequence"
    RESERVATION = "reservation"
    PROMPT = "prompt"


@dataclass(frozen=True)
class Limits:
    """What one instance can ever give one request."""

    max_model_len: int  # positions the model has: prompt + max_tokens
    kv_tokens: int  # the whole KV cache, in tokens (num_blocks x block_size)
    holds: Holds = Holds.SEQUENCE
    step_tokens: int | None = None  # without chunked prefill: one step's token budget
    vocab_size: int | None = None  # token ids must be below it (None: not checked)

    def for_reservation(self) -> Limits:
        """The limits of a decode worker's reservation (the same instance)."""
        return replace(self, holds=Holds.RESERVATION)


def limits_for(policy: ColocatedScheduler | PrefillBatcher, max_model_len: int,
               vocab_size: int | None = None) -> Limits:
    """The limits of an instance running `policy` (colocated, decode or prefill)."""
    if isinstance(policy, PrefillBatcher):
        bm = policy.block_manager
        # A batch always takes its first request whatever its length: no step limit.
        return Limits(max_model_len, bm.num_blocks * bm.block_size, Holds.PROMPT, None, vocab_size)
    if isinstance(policy, ColocatedScheduler):
        bm = policy.block_manager
        cfg = policy.config
        step = None if cfg.enable_chunked_prefill else cfg.max_num_batched_tokens
        return Limits(max_model_len, bm.num_blocks * bm.block_size, Holds.SEQUENCE, step, vocab_size)
    raise TypeError(f"no admission limits for {type(policy).__name__}")


def max_sequence_tokens(limits: Limits) -> int:
    """The longest prompt + max_tokens that can finish here: what an omitted max_tokens may fill."""
    most = limits.max_model_len
    if limits.holds is not Holds.PROMPT:
        most = min(most, limits.kv_tokens + 1)  # the last token needs no KV
        if limits.step_tokens is not None:
            most = min(most, limits.step_tokens + 1)
    return most


def admission_error(prompt_token_ids: Sequence[int], max_tokens: int, limits: Limits) -> str | None:
    """Why this request could never finish here, or None if it can. The reason names the limit."""
    p = len(prompt_token_ids)
    if p == 0:
        return "the prompt is empty (0 tokens); at least one token is needed"
    if max_tokens < 1:
        return f"max_tokens must be at least 1, got {max_tokens}"
    if limits.vocab_size is not None:
        bad = next((t for t in prompt_token_ids if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            return f"token id {bad} is outside the vocabulary (0..{limits.vocab_size - 1})"
    if p + max_tokens > limits.max_model_len:
        return (f"the prompt ({p} tokens) + max_tokens ({max_tokens}) exceeds the model's maximum "
                f"context length of {limits.max_model_len} tokens")
    sequence = p + max_tokens - 1  # tokens with KV when the last one is sampled
    need = {Holds.SEQUENCE: sequence, Holds.RESERVATION: max(sequence, p + 1), Holds.PROMPT: p}[limits.holds]
    if need > limits.kv_tokens:
        what = "the prompt" if limits.holds is Holds.PROMPT else f"the prompt ({p} tokens) + max_tokens ({max_tokens})"
        return (f"{what} needs KV for {need} tokens, more than the whole KV cache here holds "
                f"({limits.kv_tokens} tokens)")
    if limits.step_tokens is not None and limits.holds is not Holds.PROMPT and sequence > limits.step_tokens:
        return (f"the prompt ({p} tokens) + max_tokens ({max_tokens}) needs steps of {sequence} tokens, more "
                f"than max_num_batched_tokens ({limits.step_tokens}) with chunked prefill off")
    return None
