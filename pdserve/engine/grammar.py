"""Structured outputs: a request's grammar (JSON, a JSON schema, a regex, a choice) as a token mask.

Built on xgrammar: it compiles JSON schemas, regexes and EBNF against a tokenizer's vocabulary
into a pushdown automaton with precomputed per-state token masks, runs on CPU, and is what vLLM
and SGLang use by default; a mask costs tens of microseconds per row, so it fits in the decode step.

A request's grammar state is a pure function of the tokens it has output so far: `GrammarState.sync`
feeds it whatever tokens it has not seen yet. So the state needs nothing to cross a hand-off:
the prefill worker constrains the first token, the decode worker (given the prompt and, with
Start, that first token) rebuilds the state from it, and after a failover the state is rebuilt
from the tokens already streamed (the router re-prefills them with `output_offset` set).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("pdserve.grammar")

_LAX_STRING_CHAR = r'[^\"\\\r\n]'  # as xgrammar prints it in EBNF
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'
KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True)
class GuidedSpec:
    """What the output must match. `value`: the schema (JSON text), the regex, the EBNF, or a JSON
    list of choices; empty for json_object."""

    kind: str
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"guided kind must be one of {KINDS}, got {self.kind!r}")


class GrammarError(ValueError):
    """A grammar that does not compile (a bad schema or regex): the request's fault."""


class GrammarCompiler:
    """Compiles specs against one tokenizer and vocabulary size; caches by spec."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int], max_cached: int = 256) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(eos_token_ids))
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._cache: dict[GuidedSpec, Any] = {}
        self.max_cached = max_cached

    def compile(self, spec: GuidedSpec) -> Any:
        """The compiled grammar, or GrammarError naming what is wrong."""
        got = self._cache.get(spec)
        if got is not None:
            return got
        c = self._compiler
        try:
            if spec.kind in ("json_object", "json_schema"):
                # json_object is any object (xgrammar's builtin JSON grammar also admits arrays).
                # No free whitespace: a random or weak model would otherwise pad forever.
                schema = spec.value if spec.kind == "json_schema" else '{"type": "object"}'
                ebnf = str(self._xgr.Grammar.from_json_schema(schema, any_whitespace=False))
                # xgrammar 0.2's strings with a length bound admit raw control characters, which
                # JSON forbids (its unbounded strings exclude them): exclude them here too.
                got = c.compile_grammar(ebnf.replace(_LAX_STRING_CHAR, _JSON_STRING_CHAR))
            elif spec.kind == "regex":
                got = c.compile_regex(spec.value)
            elif spec.kind == "choice":
                choices = json.loads(spec.value)
                got = c.compile_grammar("root ::= " + " | ".join(json.dumps(s, ensure_ascii=False)
                                                                  for s in choices))
            else:
                got = c.compile_grammar(spec.value)
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(f"{spec.kind} does not compile: {str(e).strip().splitlines()[-1]}") from None
        if len(self._cache) >= self.max_cached:
            self._cache.pop(next(iter(self._cache)))
        self._cache[spec] = got
        return got

    def state(self, spec: GuidedSpec) -> GrammarState:
        return GrammarState(self._xgr.GrammarMatcher(self.compile(spec)))

    def bitmask(self, rows: int) -> torch.Tensor:
        return self._xgr.allocate_token_bitmask(rows, self.vocab_size)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Set the logits of tokens the grammar forbids to -inf, in place, on the given rows."""
        self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                              indices=rows)


def compiler_factory(model: str, vocab_size: int, eos_token_ids: list[int]) -> Callable[[], GrammarCompiler]:
    """What an engine serving `model` builds its compiler with, when the first guided request comes."""

    def make() -> GrammarCompiler:
        from pdserve.model.tokenizer import load_tokenizer

        return GrammarCompiler(load_tokenizer(model), vocab_size, eos_token_ids)

    return make


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.accepted = 0  # how many of the request's output tokens the matcher has consumed
        self.broken = False  # a token the grammar refused (cannot happen unless the mask was skipped)

    def sync(self, output_ids: list[int]) -> None:
        """Feed the output tokens not seen yet."""
        for tok in output_ids[self.accepted:]:
            if not self.broken and not self.matcher.is_terminated() and not self.matcher.accept_token(tok):
                log.warning("grammar refused token %d at output position %d", tok, self.accepted)
                self.broken = True
            self.accepted += 1

    @property
    def active(self) -> bool:
        """Does the grammar still constrain the next token?"""
        return not self.broken and not self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)
