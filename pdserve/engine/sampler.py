"""Token sampling for a whole batch at once: penalties, logit bias, grammar masks, temperature,
min-p, top-k, top-p, seeds, and log-probabilities, as tensor ops over the batch (one host sync, to
read the tokens back).

A seeded request's randomness is a pure function of (seed, output position): the token at position
i is argmax(logits / temperature + Gumbel noise) (the Gumbel-max trick: an exact draw from the
softmax), with the noise of every vocabulary entry taken from a SplitMix64 stream keyed by a hash of
(seed, i). Nothing else (batch, worker, device, earlier draws) enters, so a request resumed at
position k on another worker (its tokens so far appended to the prompt, `output_offset=k`) draws
exactly what it would have drawn. The noise of a whole batch is one set of integer tensor ops.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pdserve.engine.grammar import GuidedSpec

if TYPE_CHECKING:
    from pdserve.engine.grammar import GrammarCompiler, GrammarState
    from pdserve.sched.request import Request

log = logging.getLogger("pdserve.sampler")

@dataclass
class SamplingParams:
    """Named as in vLLM. `temperature == 0` is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    # Output tokens this request produced before this attempt (a resumed request re-prefills them
    # as part of its prompt): the position of its next token, which keys seeded randomness.
    output_offset: int = 0
    # OpenAI's: subtracted once from a token's logit if it occurs in the output so far (presence),
    # and once per occurrence (frequency).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # HF's and vLLM's: a logit of a token in the prompt or output is divided by it if positive,
    # multiplied if negative.
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: off; k: the sampled token's log-probability and the top k
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's (from the 2nd) and the top k
    guided: GuidedSpec | None = None  # structured output: the grammar the output must match

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (0 < self.repetition_penalty <= 10, "repetition_penalty must be in (0, 10]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs must be in [0, 20]"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k must be -1 (off) or >= 1"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (self.output_offset >= 0, "output_offset must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """A 64-bit pattern as the signed int torch's int64 holds."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def seed_key(seed: int, position: int) -> int:
    """The 64-bit key of a seeded request's draw at one output position."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return _i64(int.from_bytes(digest, "little"))


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniforms(keys: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, n] float64 in (0, 1): entry j of row r is SplitMix64 output j of the stream seeded
    with keys[r]. Integer ops wrap mod 2**64 alike on every device, so CPU and GPU agree."""
    z = keys.unsqueeze(-1) + torch.arange(1, n + 1, device=keys.device, dtype=torch.int64) * _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 11).double() + 0.5) * 2.0**-53


def draw(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Row r's token: an exact draw from softmax(logits[r]) (-inf: never drawn), keyed by keys[r]."""
    gumbel = -torch.log(-torch.log(uniforms(keys, logits.shape[-1])))
    return (logits.double() + gumbel).argmax(dim=-1)


@dataclass
class Row:
    """One row of the batch as the sampler sees it."""

    params: SamplingParams
    step: int  # tokens this worker generated for it so far (with output_offset: the output position)
    output_ids: Sequence[int] = ()  # every output token so far, a resumed attempt's included
    context_ids: Sequence[int] = ()  # prompt and output (repetition penalty)
    grammar: GrammarState | None = None  # synced to output_ids by the caller


@dataclass
class TokenLogprobs:
    """The sampled token's log-probability and the `top` most likely tokens', under the model's
    own distribution (the raw logits' log-softmax, as vLLM reports by default)."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SampleOutput:
    tokens: list[int]
    logprobs: list[TokenLogprobs | None]


def _flat(rows: list[Row], pick: str, which: list[int]) -> tuple[list[int], list[int]]:
    r: list[int] = []
    t: list[int] = []
    for i in which:
        ids = getattr(rows[i], pick)
        r.extend([i] * len(ids))
        t.extend(ids)
    return r, t


def _penalise(x: torch.Tensor, rows: list[Row]) -> None:
    """Repetition (on prompt and output tokens), then frequency and presence (on output tokens), in place."""
    dev, (b, v) = x.device, x.shape
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1]
    if rep:
        ri, ti = _flat(rows, "context_ids", rep)
        seen = torch.zeros(b, v, dtype=torch.bool, device=dev)
        seen[torch.tensor(ri, dtype=torch.long, device=dev), torch.tensor(ti, dtype=torch.long, device=dev)] = True
        pen = torch.tensor([r.params.repetition_penalty for r in rows], device=dev).unsqueeze(1)
        x.copy_(torch.where(seen, torch.where(x > 0, x / pen, x * pen), x))
    fp = [i for i, r in enumerate(rows) if r.params.frequency_penalty != 0 or r.params.presence_penalty != 0]
    if fp:
        ri, ti = _flat(rows, "output_ids", fp)
        if ri:
            counts = torch.zeros(b, v, device=dev)
            idx = (torch.tensor(ri, dtype=torch.long, device=dev), torch.tensor(ti, dtype=torch.long, device=dev))
            counts.index_put_(idx, torch.ones(len(ri), device=dev), accumulate=True)
            freq = torch.tensor([r.params.frequency_penalty for r in rows], device=dev).unsqueeze(1)
            pres = torch.tensor([r.params.presence_penalty for r in rows], device=dev).unsqueeze(1)
            x.sub_(freq * counts + pres * (counts > 0))


def _truncate(x: torch.Tensor, ps: list[SamplingParams]) -> torch.Tensor:
    """min-p, then top-k, then top-p (as vLLM), on temperature-scaled logits; returns new logits."""
    dev = x.device
    if any(p.min_p > 0 for p in ps):
        probs = torch.softmax(x, dim=-1)
        floor = probs.max(dim=-1, keepdim=True).values * torch.tensor([p.min_p for p in ps], device=dev).unsqueeze(1)
        x = x.masked_fill(probs < floor, float("-inf"))
    if not any(p.top_k > 0 or p.top_p < 1 for p in ps):
        return x
    v = x.shape[-1]
    sv, si = torch.sort(x, dim=-1, descending=True)
    k = torch.tensor([min(p.top_k, v) if p.top_k > 0 else v for p in ps], dtype=torch.long, device=dev)
    kth = sv.gather(1, (k - 1).unsqueeze(1))
    sv = sv.masked_fill(sv < kth, float("-inf"))  # ties with the k-th value stay, as torch.topk's cut does
    top_p = torch.tensor([p.top_p for p in ps], device=dev).unsqueeze(1)
    probs = torch.softmax(sv, dim=-1)
    # Drop a token once the mass before it already reaches top_p (keeps at least one).
    sv = sv.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    return torch.empty_like(x).scatter_(1, si, sv)


def sample_rows(logits: torch.Tensor, rows: list[Row], compiler: GrammarCompiler | None = None) -> SampleOutput:
    """One token per row, the whole batch at once.

    Order (as vLLM): logit bias, penalties, grammar mask; then greedy rows take the argmax and the
    others are scaled by temperature, truncated (min-p, top-k, top-p) and drawn with Gumbel noise
    keyed by (seed, output position) — or by torch's generator for unseeded rows."""
    dev = logits.device
    ps = [r.params for r in rows]
    want_lp = [p.logprobs is not None for p in ps]
    lp = torch.log_softmax(logits.float(), dim=-1) if any(want_lp) else None
    x = logits.float().clone()
    bias = [(i, t, b) for i, p in enumerate(ps) for t, b in p.logit_bias.items() if 0 <= t < x.shape[-1]]
    if bias:
        ri, ti, bi = zip(*bias, strict=True)
        x.index_put_((torch.tensor(ri, device=dev), torch.tensor(ti, device=dev)),
                     torch.tensor(bi, dtype=x.dtype, device=dev), accumulate=True)
    if any(p.penalised for p in ps):
        _penalise(x, rows)
    guided = [i for i, r in enumerate(rows) if r.grammar is not None and r.grammar.active]
    if guided:
        assert compiler is not None
        mask = compiler.bitmask(len(rows))
        for i in guided:
            rows[i].grammar.fill(mask, i)  # type: ignore[union-attr]
        compiler.apply(x, mask, guided)
    tokens = x.argmax(dim=-1)
    drawn = [i for i, p in enumerate(ps) if not p.greedy]
    if drawn:
        sub = [ps[i] for i in drawn]
        temp = torch.tensor([p.temperature for p in sub], device=dev).unsqueeze(1)
        xs = _truncate(x[drawn] / temp, sub)
        keys = (torch.randint(-(2**63), 2**63 - 1, (len(drawn),), dtype=torch.int64)
                if any(p.seed is None for p in sub) else torch.zeros(len(drawn), dtype=torch.int64))
        seeded = [(j, seed_key(p.seed, p.output_offset + rows[i].step))
                  for j, (i, p) in enumerate(zip(drawn, sub, strict=True)) if p.seed is not None]
        if seeded:
            keys[[j for j, _ in seeded]] = torch.tensor([k for _, k in seeded], dtype=torch.int64)
        tokens[drawn] = draw(xs, keys.to(dev))
    if lp is None:
        return SampleOutput(tokens.tolist(), [None] * len(rows))
    k = max(p.logprobs or 0 for p in ps)
    chosen = lp.gather(1, tokens.unsqueeze(1)).squeeze(1)
    top = lp.topk(k, dim=-1) if k else None
    tok_l, chosen_l = tokens.tolist(), chosen.tolist()
    rows_n = len(ps)  # logprobs=0 on every row: no alternatives to list
    top_v, top_i = (top.values.tolist(), top.indices.tolist()) if top is not None else ([[]] * rows_n, [[]] * rows_n)
    out: list[TokenLogprobs | None] = []
    for i, p in enumerate(ps):
        n = p.logprobs
        out.append(None if n is None else TokenLogprobs(chosen_l[i], list(zip(top_i[i][:n], top_v[i][:n], strict=True))))
    return SampleOutput(tok_l, out)


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """One token per row, for rows without token history (no penalties that need it, no grammar).
    `steps[i]`: tokens generated so far by this worker for row i; with the request's
    `output_offset` that is the output position, which keys a seeded request's randomness, so the
    same request gives the same tokens on any worker, after preemption or failover."""
    return sample_rows(logits, [Row(p, s) for p, s in zip(params, steps, strict=True)]).tokens


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
    """Row i of `logits` predicts targets[i]: its log-probability and the top k (rows beyond the
    targets, e.g. the last prompt position's, which predicts the first output token, are ignored)."""
    lp = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(targets, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
    top_v, top_i = (lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long()))
    return [TokenLogprobs(c, list(zip(i, v, strict=True))) for c, i, v in
            zip(chosen, top_i.tolist(), top_v.tolist(), strict=True)]


class BatchSampler:
    """The engine's sampler: turns the scheduled requests into rows (token history for penalties,
    grammar state kept per request) and samples them together."""

    def __init__(self, make_compiler: Callable[[], GrammarCompiler] | None = None) -> None:
        self._make_compiler = make_compiler  # built on first use: xgrammar and the tokenizer load then
        self._compiler: GrammarCompiler | None = None
        self._build_lock = threading.Lock()  # one build, whichever thread asks first
        self._warming: threading.Thread | None = None
        # Per-request grammar state; dropped with the request (no bookkeeping on finish or abort).
        self._grammars: weakref.WeakKeyDictionary[Request, GrammarState] = weakref.WeakKeyDictionary()
        # Prompt log-probabilities gathered chunk by chunk until the first token is sampled.
        self._prompt_lps: weakref.WeakKeyDictionary[Request, list[TokenLogprobs]] = weakref.WeakKeyDictionary()

    def add_prompt_logits(self, req: Request, start: int, logits: torch.Tensor) -> None:
        """Logits of prompt positions start.. (one prefill chunk of a request that asked for prompt logprobs)."""
        p = req.payload
        assert isinstance(p, SamplingParams) and p.prompt_logprobs is not None
        targets = req.prompt_token_ids[start + 1: start + 1 + logits.shape[0]]
        if targets:
            self._prompt_lps.setdefault(req, []).extend(prompt_logprobs(logits, targets, p.prompt_logprobs))

    def take_prompt_logprobs(self, req: Request) -> list[TokenLogprobs] | None:
        return self._prompt_lps.pop(req, None)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampleOutput:
        rows = []
        for r in requests:
            p = r.payload if isinstance(r.payload, SamplingParams) else SamplingParams()
            row = Row(p, len(r.output_token_ids))
            if p.penalised or p.guided is not None:
                # A resumed attempt's earlier output is the tail of its prompt.
                prior = r.prompt_token_ids[len(r.prompt_token_ids) - p.output_offset:] if p.output_offset else []
                row.output_ids = prior + r.output_token_ids
                row.context_ids = r.all_token_ids if p.repetition_penalty != 1 else ()
            if p.guided is not None:
                row.grammar = self._grammar(r, p.guided)
                row.grammar.sync(list(row.output_ids))
            rows.append(row)
        return sample_rows(logits, rows, self._compiler)

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            with self._build_lock:  # a build under way in the background (`warm`): wait for it
                if self._compiler is None:
                    if self._make_compiler is None:
                        raise ValueError("this engine has no grammar compiler (structured outputs need a tokenizer)")
                    self._compiler = self._make_compiler()
        return self._compiler

    def warm(self) -> bool:
        """Build the compiler on a background thread, once (it takes seconds: xgrammar imports
        transformers); whoever needs it meanwhile waits for that build. True while the build is
        under way; False once the compiler is built or its build failed (`check` then compiles,
        or says why it cannot)."""
        if self._compiler is not None or self._make_compiler is None:
            return False
        if self._warming is None:
            self._warming = threading.Thread(target=self._build_quietly, name="grammar-build", daemon=True)
            self._warming.start()
        return self._warming.is_alive()

    def _build_quietly(self) -> None:
        try:
            _ = self.compiler
        except Exception:  # noqa: BLE001 - the next request's own check reports it
            log.exception("building the grammar compiler failed")

    def check(self, spec: GuidedSpec) -> None:
        """Compile now (cached), so that a bad grammar is refused at admission, not mid-step.
        Raises ValueError (GrammarError) saying what is wrong."""
        self.compiler.compile(spec)

    def _grammar(self, r: Request, spec: GuidedSpec) -> GrammarState:
        g = self._grammars.get(r)
        if g is None:
            g = self._grammars[r] = self.compiler.state(spec)
        return g
