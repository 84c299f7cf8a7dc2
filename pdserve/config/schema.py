"""The one definition of every setting: its type, default, bounds and one-line help.

A cluster (`pdserve up --config cluster.yaml`) is a `ClusterConfig`: top-level worker settings and
the sections `cache`, `prefill`, `decode`, `colocated`, `transfer`, `router`. The role sections
*are* the scheduling policies' configs (`PrefillSection` is a `PrefillConfig` plus its worker
count), so a worker and the simulator built from the same file run identical policies.

Everything else is derived from these classes: the YAML reader (`pdserve.config.load`), the CLI
flags of `up`, `serve`, `router` and `sim` (`pdserve.config.flags`), the README's YAML reference
(`reference_yaml`). Fields are declared with `section.py`'s `H`; bounds live in `Meta` (checked
when a file or flag is read, and by `Section.__post_init__` when code builds a config directly);
rules between fields live in `check`.
This module is torch-free and does no I/O.
"""

import typing
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, field

from pdserve.config.section import ConfigError as ConfigError
from pdserve.config.section import H, Section, require

# ---- per-instance policies (the `sched/` and `transfer/` configs) ------------------------------

CPU_KV_CACHE_GB = 0.5  # the KV cache of a cpu worker when no size is given


class CacheConfig(Section):
    """The paged KV cache of every worker (and the decode CUDA graphs that read it)."""

    block_size: H(Literal[1, 2, 4, 8, 16, 32, 64, 128], "tokens per KV block") = 16
    num_blocks: H(int, "KV blocks per worker (0: as many as kv_cache_memory_gb holds)", ge=0) = 0
    kv_cache_memory_gb: H(float, "memory for KV tensors per worker when num_blocks is 0 (0: on cuda, what "
                          f"gpu_memory_utilization leaves; on cpu, {CPU_KV_CACHE_GB})", ge=0) = 0.0
    gpu_memory_utilization: H(float, "cuda: share of the device's memory this worker may use (weights, "
                              "activations, KV), as vLLM", gt=0, le=1) = 0.9
    enforce_eager: H(bool, "cuda: run decode steps eagerly, not as captured CUDA graphs (cpu: always eager)") = False
    cuda_graph_max_batch: H(int, "cuda: largest decode batch captured as a CUDA graph (larger ones run eagerly)",
                            ge=1) = 64
    enable_prefix_caching: H(bool, "reuse the KV of cached prompt prefixes (hash chain of full blocks)") = True
    eviction: H(Literal["lru", "fifo"], "which cached, unused block is evicted first") = "lru"
    decode_attention: H(Literal["auto", "native", "torch"],
                        "cpu float32 decode attention: native (C kernel reading blocks in place, built on first "
                        "use), torch (gather + SDPA), auto (native if it builds)") = "auto"
    decode_linear: H(Literal["auto", "native", "torch"],
                     "cpu float32 projections of decode-sized steps: native (C kernel, W read in place, batch-"
                     "invariant; steps up to 32 tokens), torch (F.linear), auto (native where measured faster)"
                     ) = "auto"
    decode_layer: H(Literal["auto", "native", "torch"],
                    "cpu float32 decode steps (every sequence one token): native (each decoder layer one C call: "
                    "the native projections and attention in one OpenMP region; up to 32 sequences), torch (op "
                    "by op), auto (native unless decode_linear is torch; needs decode_attention native)") = "auto"
    prefill_ops: H(Literal["auto", "native", "torch"],
                   "cpu float32 steps not fused as decode steps (prefill chunks, mixed, over 32 tokens): native "
                   "(RMSNorm, residual adds, RoPE + KV write, silu * up as C kernels between the projections), "
                   "torch (op by op), auto (native if it builds)") = "auto"
    prefill_attention: H(Literal["auto", "native", "torch"],
                         "cpu float32 prefill attention: native (one C call per layer for every chunk, K/V read in "
                         "place, causal by position), torch (SDPA; continuing chunks gathered and masked), auto "
                         "(native where its vector path applies: AVX-512, head_dim 64/128, GQA group 1/2/4/8)") = "auto"


class SchedulerConfig(Section):
    """Colocated continuous batching with chunked prefill (Sarathi-Serve)."""

    max_num_batched_tokens: H(int, "token budget per step: decode tokens + prefill chunks", ge=1) = 512
    max_num_seqs: H(int, "sequences running at once", ge=1) = 64
    enable_chunked_prefill: H(bool, "split long prompts into chunks that share steps with decodes") = True


class PrefillConfig(Section):
    """Prefill-role batching: start a batch at a utilization target or after a maximum wait."""

    max_batch_tokens: H(int, "the prefill worker's saturation token budget per batch", ge=1) = 2048
    target_utilization: H(float, "start a batch once queued tokens reach this share of the budget",
                          gt=0, le=1) = 0.85
    # 0: a lone prompt on an idle worker starts at once, as on a colocated worker; batches still form
    # from what queues while a batch computes. A wait only pays for bursts on an idle worker.
    max_wait_ms: H(float, "...or once the oldest queued prompt has waited this long (0: start at once)",
                   ge=0) = 0.0
    max_num_seqs: H(int, "prompts per prefill batch", ge=1) = 64
    length_buckets: H(list[int], "prompt length bounds of separate queues, e.g. 512,1024 (empty: one queue)"
                      ) = field(default_factory=list)
    min_batch_scale: H(float, "lowest share of the budget used under decode back-pressure", gt=0, le=1) = 0.25
    chunk_tokens: H(int, "chunked prefill: prompt tokens per step per request (0: whole prompt)", ge=0) = 0
    decode_hold_ms: H(float, "decode behind (a queue on it): start no prefill batch for up to this long after "
                      "the last one (0: never hold)", ge=0) = 0.0

    def check(self) -> None:
        require(all(isinstance(b, int) and b > 0 for b in self.length_buckets), "length_buckets",
               "must be positive integers")
        require(list(self.length_buckets) == sorted(set(self.length_buckets)), "length_buckets",
               "must be strictly increasing")


class DecodeConfig(Section):
    """Decode-role continuous batching."""

    max_batch_size: H(int, "sequences decoded per step", ge=1) = 64
    max_num_seqs: H(int, "sequences admitted at once (running + reserved)", ge=1) = 128
    max_num_batched_tokens: H(int, "token budget when the decode worker runs a prefill itself", ge=1) = 512
    adaptive_batch: H(bool, "grow the batch with the queue, bounded by tpot_target_ms") = False
    tpot_target_ms: H(float, "adaptive batch: per-token time bound (0: none)", ge=0) = 0.0
    min_batch_size: H(int, "adaptive batch: smallest batch", ge=1) = 8
    reservation_timeout_s: H(float, "reserved blocks are freed after this with no KV and no prefill progress", gt=0) = 30.0

    def check(self) -> None:
        require(self.max_num_seqs >= self.max_batch_size, "max_num_seqs", "must be >= max_batch_size")
        require(self.min_batch_size <= self.max_batch_size, "min_batch_size",
               "must be <= max_batch_size (lower min_batch_size too)")


class TransferConfig(Section):
    """KV transfer between prefill and decode workers."""

    transport: H(Literal["tcp", "shm", "auto"], "KV transport: tcp, shm (shared memory, same machine), or auto "
                 "(per pair: shm when both workers are on one node, else tcp)") = "tcp"
    bandwidth_gbps: H(float, "link emulation: bandwidth in Gb/s (0: as fast as the transport goes)", ge=0) = 0.0
    latency_ms: H(float, "link emulation: one-way latency added per chunk", ge=0) = 0.0
    max_frame_bytes: H(int, "largest KV frame accepted", ge=4096) = 256 * 1024 * 1024
    timeout_s: H(float, "a transfer without progress this long fails; both sides free its blocks", gt=0) = 30.0
    fault_corrupt_prob: H(float, "fault injection (tests, drills): corrupt a chunk after its checksum",
                          ge=0, le=1) = 0.0
    fault_cut_prob: H(float, "fault injection (tests, drills): cut the connection after a chunk", ge=0, le=1) = 0.0
    fault_prompt_delay_ms: H(float, "fault injection (tests, drills): this worker holds every prompt this long "
                                    "before computing it (a slow worker; any role)", ge=0) = 0.0


class ListenConfig(Section):
    """Where an HTTP server listens."""

    host: H(str, "address the HTTP API listens on") = "127.0.0.1"
    port: H(int, "port of the HTTP API (0: pick a free one)", ge=0, le=65535) = 8000
    api_key: H(str, "require this Bearer key on the HTTP API (empty: none)") = ""


class LaunchConfig(Section):
    """Where `pdserve up` runs its workers: local processes, or a Ray cluster."""

    launcher: H(Literal["local", "ray"], "local: processes on this machine; ray: one Ray actor per worker") = "local"
    ray_address: H(str, "launcher ray: the cluster to join (auto: the one running here or RAY_ADDRESS; "
                        "HOST:PORT; empty: start a private one)") = ""
    ray_bind_node_address: H(bool, "launcher ray: workers listen on their node's address (not 127.0.0.1), "
                                   "so a router on another node reaches them") = False
    ray_max_restarts: H(int, "launcher ray: restarts of a worker whose process died, before it is given up",
                        ge=0) = 3


class RouterConfig(ListenConfig):
    """The router: routing, retries, timeouts, circuit breakers."""

    disagg_threshold: H(int, "prompts shorter than this many tokens skip the prefill pool", ge=0) = 0
    routing: H(Literal["least_loaded", "prefix_aware"],
               "worker choice: least queued work, or also count the prompt's blocks a worker already caches"
               ) = "least_loaded"
    max_inflight: H(int, "requests in the router at once; beyond them: 503 with Retry-After", ge=1) = 512
    max_attempts: H(int, "tries per request across worker failures", ge=1) = 4
    reserve_timeout_s: H(float, "a decode worker silent this long on a reservation is skipped", gt=0) = 2.0
    reserve_wait_s: H(float, "every decode worker full: wait this long for room before answering 503 "
                      "(0: at once)", ge=0) = 5.0
    first_token_timeout_s: H(float, "prefill silent this long before the first token: try elsewhere", gt=0) = 60.0
    token_timeout_s: H(float, "decode silent this long mid-stream: try elsewhere", gt=0) = 30.0
    request_timeout_s: H(float, "overall deadline of one request", gt=0) = 600.0
    backoff_base_s: H(float, "first retry backoff (doubles per attempt, with jitter)", ge=0) = 0.05
    backoff_max_s: H(float, "longest retry backoff", ge=0) = 2.0
    stats_interval_s: H(float, "heartbeat: how often workers are asked for their load", gt=0) = 0.1
    hedge_after_ms: H(float, "hedged prefill: a request without its first token this long gets a duplicate on "
                             "another worker, the first to answer wins (0: off)", ge=0) = 0.0
    hedge_percentile: H(float, "hedged prefill: wait at least this percentile of recent first-token times (0: the "
                               "fixed delay alone)", ge=0, le=100) = 0.0
    hedge_max_fraction: H(float, "hedged prefill: at most this share of recent requests is hedged", ge=0, le=1) = 0.05
    breaker_failures: H(int, "consecutive failures that open a worker's or link's circuit breaker", ge=1) = 3
    breaker_reset_s: H(float, "an open breaker lets one probe through after this", gt=0) = 5.0
    breaker_probe_timeout_s: H(float, "a half-open probe with no outcome this long no longer blocks the next one",
                               gt=0) = 30.0
    otlp_traces_endpoint: H(str, "OpenTelemetry: send request traces to this OTLP/HTTP endpoint, router and "
                            "workers (empty: off)") = ""


class PlannerConfig(Section):
    """The online SLA planner: every interval, the P:D split (or all colocated) the traffic needs."""

    mode: H(Literal["off", "sla"], "sla: switch workers' roles (and, with elastic, add or remove workers) to "
            "meet the TTFT/TPOT SLOs; off: the split stays as started") = "off"
    interval_s: H(float, "how often the planner measures and decides", gt=0) = 60.0
    predictor: H(Literal["constant", "holt"], "next interval's load: the last one, or Holt's linear trend "
                 "(double exponential smoothing)") = "holt"
    slo_ttft_ms: H(float, "p90 time-to-first-token target", gt=0) = 2000.0
    slo_tpot_ms: H(float, "p90 time-per-output-token target", gt=0) = 100.0
    modes: H(Literal["auto", "disagg", "colocated"], "splits the planner may choose: auto also turns "
             "disaggregation off (all colocated) and back on") = "auto"
    min_prefill: H(int, "fewest prefill workers while disaggregated (above 0: never all colocated)", ge=0) = 0
    max_prefill: H(int, "most prefill workers (0: no limit)", ge=0) = 0
    min_decode: H(int, "fewest decode workers while disaggregated (above 0: never all colocated)", ge=0) = 0
    max_decode: H(int, "most decode workers (0: no limit)", ge=0) = 0
    min_colocated: H(int, "fewest colocated workers (above 0: never disaggregated)", ge=0) = 0
    max_colocated: H(int, "most colocated workers (0: no limit)", ge=0) = 0
    elastic: H(bool, "also add and remove workers through the launcher (off: only switch roles)") = False
    max_workers: H(int, "elastic: most workers in all (0: as many as started)", ge=0) = 0
    cooldown_s: H(float, "no scale-down, mode flip or role switch this soon after the last change "
                  "(scale-up is never delayed)", ge=0) = 180.0
    max_utilization: H(float, "plan no worker above this share of its saturated rate, whatever the SLO "
                       "model allows (bursts, spread of lengths)", gt=0, le=1) = 0.8
    hysteresis: H(float, "a change must beat the running split by this share (scale-down: the need must be "
                  "this far below the count)", ge=0, lt=1) = 0.15
    profile: H(str, "step-time profile (pdserve profile) the performance model uses (empty: the roofline of "
               "the model on gpu)") = ""
    gpu: H(str, "hardware of the roofline model when no profile is given (pdserve sim's catalog)") = "h100"
    tp: H(int, "tensor-parallel degree of the roofline model (0: the smallest that fits)", ge=0) = 0

    def check(self) -> None:
        for role in ("prefill", "decode", "colocated"):
            lo, hi = getattr(self, f"min_{role}"), getattr(self, f"max_{role}")
            require(hi == 0 or lo <= hi, f"min_{role}", f"must be <= max_{role}")


# ---- the cluster file -------------------------------------------------------------------------

# A role's placement under `--launcher ray` (the same two settings in each role's section).
RayResources = H(dict[str, float], "launcher ray: resources each worker of this role needs, e.g. "
                 "{GPU: 1, node_a: 0.01} (CPU and GPU as Ray counts them; other keys are custom resources)")
RayStrategy = H(Literal["pack", "spread"], "launcher ray: pack this role's workers onto few nodes (Ray's "
                "default placement), or spread them across nodes")


class _Role:
    """A role's section: its worker count on top of its policy's config (the first base class)."""

    def policy(self):  # type: ignore[no-untyped-def]
        """The policy's config alone (what the worker's and the simulator's scheduler get)."""
        base = next(b for b in type(self).__mro__[1:] if issubclass(b, Section))
        return base(**{name: getattr(self, name) for name in base.__struct_fields__})


class PrefillSection(PrefillConfig, _Role):
    """Prefill workers and their batching policy."""

    workers: H(int, "prefill workers", ge=0) = 1
    ray_resources: RayResources = field(default_factory=dict)
    ray_strategy: RayStrategy = "pack"

    def policy(self) -> PrefillConfig:
        return typing.cast(PrefillConfig, _Role.policy(self))


class DecodeSection(DecodeConfig, _Role):
    """Decode workers and their batching policy."""

    workers: H(int, "decode workers", ge=0) = 1
    ray_resources: RayResources = field(default_factory=dict)
    ray_strategy: RayStrategy = "pack"

    def policy(self) -> DecodeConfig:
        return typing.cast(DecodeConfig, _Role.policy(self))


class ColocatedSection(SchedulerConfig, _Role):
    """Colocated workers (prefill and decode in one) and their batching policy."""

    workers: H(int, "colocated workers", ge=0) = 0
    ray_resources: RayResources = field(default_factory=dict)
    ray_strategy: RayStrategy = "pack"

    def policy(self) -> SchedulerConfig:
        return typing.cast(SchedulerConfig, _Role.policy(self))


class ClusterConfig(Section):
    """A cluster: what `pdserve up` starts and `pdserve sim` simulates; one worker of it is `pdserve serve`."""

    model: H(str, "HF model folder or a catalog name (demo, llama-3.1-8b, ...)") = "demo"
    served_model_name: H(str, "the model id clients send and /v1/models lists (empty: --model)") = ""
    dtype: H(Literal["", "float32", "bfloat16", "float16"], "weights and KV dtype (empty: the model's own)") = ""
    device: H(str, "cpu, cuda or cuda:N") = "cpu"
    threads: H(int, "torch threads per worker (0: torch's default for one `serve`, 1 under `up`)", ge=0) = 0
    seed: H(int, "seed of dummy weights") = 0
    max_waiting: H(int, "requests queued on a worker before it refuses more (overload; 0: refuse all)", ge=0) = 256
    fault_prefill_delay_ms: H(float, "fault injection (drills, alert tests): extra time per prefill-role step",
                              ge=0) = 0.0
    fault_decode_step_delay_ms: H(float, "fault injection (drills, alert tests): extra time per decode-role step",
                                  ge=0) = 0.0
    fault_delay_file: H(str, "fault injection: JSON file re-read each second whose keys override the two delays"
                        ) = ""
    cache: CacheConfig = field(default_factory=CacheConfig)
    prefill: PrefillSection = field(default_factory=PrefillSection)
    decode: DecodeSection = field(default_factory=DecodeSection)
    colocated: ColocatedSection = field(default_factory=ColocatedSection)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)

    def check(self) -> None:
        require(self.num_workers > 0, "workers", "the cluster needs at least one worker")
        require(self.prefill.workers == 0 or self.decode.workers > 0, "decode.workers",
               "prefill workers need at least one decode worker to send KV to")

    @property
    def num_workers(self) -> int:
        return self.prefill.workers + self.decode.workers + self.colocated.workers

    @property
    def public_model_name(self) -> str:
        """The model id of the HTTP API."""
        return self.served_model_name or self.model

    def role(self, name: str) -> PrefillSection | DecodeSection | ColocatedSection:
        """The section (= the policy config) of a role: 'prefill', 'decode' or 'colocated'."""
        require(name in ROLES, "role", f"must be one of {', '.join(ROLES)}")
        return typing.cast(PrefillSection | DecodeSection | ColocatedSection, getattr(self, name))


ROLES = ("prefill", "decode", "colocated")
SECTIONS: dict[str, type[Section]] = {"cache": CacheConfig, "prefill": PrefillSection, "decode": DecodeSection,
                                      "colocated": ColocatedSection, "transfer": TransferConfig,
                                      "router": RouterConfig, "launch": LaunchConfig,
                                      "planner": PlannerConfig}


def settings(cls: type[Section]) -> list[tuple[str, Any, Any, str]]:
    """(name, type without its Annotated wrapper, default, help) of each scalar/list setting of cls."""
    out = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in msgspec.structs.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and issubclass(tp, Section):
            continue
        base, help_text = tp, ""
        if typing.get_origin(tp) is Annotated:
            base, *metas = typing.get_args(tp)
            help_text = next((m.description for m in metas if isinstance(m, Meta) and m.description), "")
        default = f.default_factory() if f.default_factory is not msgspec.NODEFAULT else f.default
        out.append((f.name, base, default, help_text))
    return out


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '""' if v == "" else v
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {x}" for k, x in v.items()) + "}"
    return repr(v)


def reference_yaml() -> str:
    """Every key of the cluster file with its default and help: the README's reference block."""
    lines = []

    def emit(cls: type[Section], indent: str) -> None:
        ordered = sorted(settings(cls), key=lambda s: s[0] != "workers")  # a role's worker count first
        rows = [(f"{indent}{name}: {_yaml_value(default)}", help_text) for name, _, default, help_text in ordered]
        width = max(len(r[0]) for r in rows)
        lines.extend(f"{key:<{width}}  # {help_text}" for key, help_text in rows)

    emit(ClusterConfig, "")
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:  # {cls.__doc__}")
        emit(cls, "  ")
    return "\n".join(lines) + "\n"
