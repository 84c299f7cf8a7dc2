"""Prompts of exact token counts: seeded random token ids from the model's vocabulary.

Sent as a token-id list (`prompt: [ids]`), so the server sees exactly the spec's length with no
re-tokenization drift. Special tokens are left out, and every prompt is different, so no prefix
cache hit shortens a prefill.
"""

from __future__ import annotations

import random

from pdserve.workload import RequestSpec


def vocab_ids(model: str) -> list[int]:
    """Ids of the model's ordinary (non-special) tokens."""
    from pdserve.model.tokenizer import load_tokenizer  # heavy (transformers); only when prompts are made

    tok = load_tokenizer(model)
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    return [i for i in range(len(tok)) if i not in special]


def synth_prompts(specs: list[RequestSpec], ids: list[int], seed: int = 0) -> list[list[int]]:
    """One token-id prompt of length `spec.prompt_tokens` per spec, reproducible for a seed."""
    rng = random.Random(seed * 7_919 + 3)
    return [rng.choices(ids, k=s.prompt_tokens) for s in specs]
