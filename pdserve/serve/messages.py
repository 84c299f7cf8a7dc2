"""Typed control messages between the router and workers (msgpack via msgspec: data, never code).

Router -> worker:  Generate, Reserve, Prefill, Start, Abort, StatsQuery
Worker -> router:  Reserved, Tokens, TransferDone, Stats
Every message names its request, so one connection carries many requests at once.
"""

from __future__ import annotations

import msgspec

from pdserve.engine.grammar import GuidedSpec
from pdserve.engine.sampler import SamplingParams, TokenLogprobs
from pdserve.sched.backpressure import DecodeSignal


class Params(msgspec.Struct, frozen=True):
    """A request's sampling parameters as they cross every hop (router -> prefill, -> decode, and
    again on each retry). Everything else the sampler needs is rebuilt from token ids that cross
    anyway: the output-token counts of the penalties and the grammar state come from the tokens
    output so far, which the decode worker has (the prompt, then the first token with Start) and a
    resumed attempt has (the tail of its prompt, `output_offset` long)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    min_tokens: int = 0
    output_offset: int = 0  # a resumed request's tokens so far: its seeded randomness goes on from there
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] = {}
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    guided_kind: str = ""  # structured output (engine/grammar.py); "" when none
    guided_value: str = ""

    @classmethod
    def of(cls, p: SamplingParams) -> Params:
        g = p.guided
        return cls(p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, list(p.stop_token_ids),
                   p.ignore_eos, p.min_tokens, p.output_offset, p.presence_penalty, p.frequency_penalty,
                   p.repetition_penalty, p.min_p, dict(p.logit_bias), p.logprobs, p.prompt_logprobs,
                   g.kind if g else "", g.value if g else "")

    def sampling(self) -> SamplingParams:
        """Validated engine parameters (raises ValueError on out-of-range values)."""
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop_token_ids=list(self.stop_token_ids),
                              ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                              output_offset=self.output_offset, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty, min_p=self.min_p,
                              logit_bias=dict(self.logit_bias), logprobs=self.logprobs,
                              prompt_logprobs=self.prompt_logprobs,
                              guided=GuidedSpec(self.guided_kind, self.guided_value) if self.guided_kind else None)


class Logprob(msgspec.Struct, array_like=True, frozen=True):
    """One output token's log-probability and the top alternatives: [(token id, logprob), ...]."""

    logprob: float
    top: list[tuple[int, float]] = []

    @classmethod
    def of(cls, lp: TokenLogprobs) -> Logprob:
        return cls(lp.logprob, list(lp.top))


class Generate(msgspec.Struct, tag="generate", frozen=True):
    """Serve the whole request here (colocated worker, or a decode worker running the prefill)."""

    request_id: str
    prompt_token_ids: list[int]
    params: Params
    traceparent: str = ""


class Reserve(msgspec.Struct, tag="reserve", frozen=True):
    """Decode: hold KV blocks for this prompt; answer at once."""

    request_id: str
    prompt_token_ids: list[int]
    params: Params
    traceparent: str = ""


class Prefill(msgspec.Struct, tag="prefill", frozen=True):
    """Prefill: compute the prompt, sample the first token, push KV into the decode worker's blocks."""

    request_id: str
    prompt_token_ids: list[int]
    params: Params
    kv_address: str
    block_ids: list[int]
    block_size: int
    decode: DecodeSignal | None = None  # back-pressure: the decode pool's load, summed by the router
    kv_node: str = ""  # the decode worker's node: with transport auto, shm only when it is the prefill's
    decode_worker: str = ""  # the decode worker's name at the router: the transfer metrics' label
    traceparent: str = ""  # W3C trace context of the request (tracing on), for this worker's spans


class Start(msgspec.Struct, tag="start", frozen=True):
    """Decode: the first token; admit the request once its KV has fully arrived."""

    request_id: str
    first_token: int


class Abort(msgspec.Struct, tag="abort", frozen=True):
    request_id: str


class Renew(msgspec.Struct, tag="renew", frozen=True):
    """Router to decode: the reserved request's prefill is making progress; keep its reservation
    (`reservation_timeout_s` from now). Only the connection that reserved it may renew it."""

    request_id: str


class StatsQuery(msgspec.Struct, tag="stats_query", frozen=True):
    nonce: str
    decode: DecodeSignal | None = None  # to prefill workers: the decode pool's load (back-pressure)
    kv_events: bool = False  # the router's heartbeat: also hand over the block-hash events since the last one


class SwitchRole(msgspec.Struct, tag="switch_role", frozen=True):
    """Router to worker: become `role`, keeping weights and KV memory; answered by RoleSwitched once
    done. New work is refused meanwhile; what is still held after `grace_s` is handed back."""
    nonce: str
    role: str
    grace_s: float = 30.0


class RoleSwitched(msgspec.Struct, tag="role_switched", frozen=True):
    nonce: str
    role: str  # the role the worker now runs
    error: str = ""  # why it could not switch (it then runs `role`, its old one)


class Reserved(msgspec.Struct, tag="reserved", frozen=True):
    request_id: str
    ok: bool
    kv_address: str = ""
    block_ids: list[int] = []
    block_size: int = 0
    reason: str = ""
    node_id: str = ""  # the decode worker's node (transfer/pairing.py)


class Tokens(msgspec.Struct, tag="tokens", frozen=True):
    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None
    error_kind: str = ""  # invalid | transfer | overloaded | draining | internal
    timings: dict[str, float] = {}
    num_cached_tokens: int = 0
    logprobs: list[Logprob] = []  # one per token in token_ids, when the request asked for logprobs
    prompt_logprobs: list[Logprob] = []  # with the first token: prompt tokens 2.., when asked for


class Progress(msgspec.Struct, tag="progress", frozen=True):
    """Prefill to router: the request is still being prefilled here (queued or part-computed, no
    first token yet); the router is not kept waiting by a silent worker, and renews its decode
    reservation."""

    request_id: str


class TransferDone(msgspec.Struct, tag="transfer_done", frozen=True):
    request_id: str
    ok: bool
    seconds: float = 0.0
    error: str = ""


class MetricSample(msgspec.Struct, array_like=True, frozen=True):
    name: str
    labels: dict[str, str]
    value: float


class MetricFamily(msgspec.Struct, frozen=True):
    """One of a worker's cumulative metrics (counter or histogram), as its registry collected it;
    the router re-exports it with the worker's name in the label `self_label`."""

    name: str
    kind: str
    help: str
    samples: list[MetricSample]
    self_label: str = "worker"


class Stats(msgspec.Struct, tag="stats", frozen=True):
    nonce: str
    role: str
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    busy_fraction: float
    queued_prompt_tokens: int = 0
    reserved: int = 0
    block_size: int = 16
    draining: bool = False
    node_id: str = ""  # the machine (Ray node) the worker runs on
    kv_sent_tcp: int = 0  # prefill: transfers completed over tcp / shm since start
    kv_sent_shm: int = 0
    kv_received: int = 0  # decode: transfers received complete since start
    # Block-hash events (asked for with kv_events): prefix-cache chain keys cached / evicted since
    # the last such query; kv_cleared: forget the earlier ones (kv_stored is then the whole cache).
    kv_stored: list[bytes] = []
    kv_evicted: list[bytes] = []
    kv_cleared: bool = False
    cache_salt: bytes = b""  # the chain's salt, so the router hashes prompts as this worker does
    transfers_in_flight: int = 0
    metrics: list[MetricFamily] = []
    switching: str = ""  # the role it is switching to (it refuses new work meanwhile), else empty


ToWorker = Generate | Reserve | Prefill | Start | Abort | Renew | StatsQuery | SwitchRole
ToRouter = Reserved | Tokens | Progress | TransferDone | Stats | RoleSwitched

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_to_router = msgspec.msgpack.Decoder(ToRouter)


def encode(msg: ToWorker | ToRouter) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(data: bytes) -> ToWorker:
    """Raises msgspec.ValidationError / DecodeError on anything malformed."""
    return _to_worker.decode(data)


def decode_to_router(data: bytes) -> ToRouter:
    return _to_router.decode(data)
