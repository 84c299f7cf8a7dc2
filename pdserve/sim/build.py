"""From a cluster (the schema's `ClusterConfig`, as `pdserve up` reads it) and hardware to
SimInstances holding the real `sched/` policies, configured from the same sections."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pdserve.config.load import cluster_from_dict, merge, to_dict
from pdserve.config.model import ModelShape, resolve_shape
from pdserve.config.schema import ClusterConfig, ConfigError
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.colocated import ColocatedScheduler
from pdserve.sched.decode import DecodeScheduler
from pdserve.sched.prefill import PrefillBatcher
from pdserve.sched.routing import RoutingPolicy
from pdserve.sim.cluster import Simulator
from pdserve.sim.hardware import get_gpu, get_link
from pdserve.sim.instance import SimInstance
from pdserve.sim.network import Port
from pdserve.sim.perf_model import RooflineModel, StepTimeModel, kv_capacity_tokens
from pdserve.sim.profile import ProfiledModel, serving_overheads

# The serving settings the planner and the seed scenario assume for a GPU cluster (large batches,
# a short prefill wait). Written out here, not defaults: `pdserve sim` and `pdserve up` use the
# schema's, or a cluster file's; a file with these values makes `up` run the same policies.
GPU_SCALE: dict[str, Any] = {
    "prefill": {"max_batch_tokens": 8192, "max_wait_ms": 5.0, "max_num_seqs": 256},
    "decode": {"max_batch_size": 256, "max_num_seqs": 512, "max_num_batched_tokens": 2048},
    "colocated": {"max_num_batched_tokens": 2048, "max_num_seqs": 256},
}


@dataclass
class SimConfig:
    """A cluster to simulate: the cluster `pdserve up` would start (model, worker counts, every policy
    setting: `pdserve.config.schema`) on hardware given separately (GPUs, TP, link, or a profile).

    KV capacity per instance: `cluster.cache.num_blocks` if set, else what fits beside the weights
    on the GPU. Prefix caching is off in the simulator: its requests carry no real tokens.
    """

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    prefill_gpu: str = "h100"
    decode_gpu: str = "h100"  # colocated instances use prefill_gpu
    tp_prefill: int = 1
    tp_decode: int = 1
    link: str = "cx7-400g"
    profile: str | None = None  # a measured profile replaces the roofline
    serving_overheads: bool = True  # with a profile: add its measured serving overheads (pdserve calibrate)
    layerwise: bool = True  # KV streamed per layer during prefill
    price_prefill: float | None = None
    price_decode: float | None = None

    def __post_init__(self) -> None:
        for key in ("prefill_gpu", "decode_gpu"):
            try:
                get_gpu(getattr(self, key))
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
        try:
            get_link(self.link)
        except ValueError as e:
            raise ConfigError(f"link: {e}") from None
        if self.profile and not Path(self.profile).is_file():
            raise ConfigError(f"profile: no such file: {self.profile}")
        if self.tp_prefill < 1 or self.tp_decode < 1:
            raise ConfigError("tp: must be >= 1")

    @classmethod
    def of(cls, model: str | None = None, mode: str | None = None, num_prefill: int | None = None,
           num_decode: int | None = None, num_colocated: int | None = None,
           serving: dict[str, Any] | None = None, **hardware: Any) -> SimConfig:
        """From worker counts and serving settings (nested like a cluster file) on top of the schema's."""
        data = merge(serving or {}, {"model": model} if model else {})
        return cls(cluster_from_dict(with_workers(data, mode, num_prefill, num_decode, num_colocated)), **hardware)

    def with_workers(self, prefill: int | None = None, decode: int | None = None,
                     colocated: int | None = None) -> SimConfig:
        data = with_workers(to_dict(self.cluster), None, prefill, decode, colocated)
        return replace(self, cluster=cluster_from_dict(data))

    @property
    def model(self) -> str:
        return self.cluster.model

    @property
    def mode(self) -> str:
        """'colocated' (N colocated instances) or 'disagg' (P prefill + D decode)."""
        c = self.cluster
        if c.colocated.workers and (c.prefill.workers or c.decode.workers):
            raise ConfigError("workers: the simulator runs a colocated cluster or a prefill + decode one, not both")
        return "colocated" if c.colocated.workers else "disagg"

    @property
    def num_prefill(self) -> int:
        return self.cluster.prefill.workers

    @property
    def num_decode(self) -> int:
        return self.cluster.decode.workers

    @property
    def num_colocated(self) -> int:
        return self.cluster.colocated.workers

    def as_dict(self) -> dict[str, Any]:
        """For JSON results: the cluster's settings and the hardware."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cluster"}
        return {"cluster": to_dict(self.cluster), "mode": self.mode, **d}

    @property
    def num_gpus(self) -> int:
        if self.mode == "colocated":
            return self.num_colocated * self.tp_prefill
        return self.num_prefill * self.tp_prefill + self.num_decode * self.tp_decode

    def cost_per_hour(self) -> float:
        pg = get_gpu(self.prefill_gpu, self.price_prefill)
        if self.mode == "colocated":
            return self.num_colocated * self.tp_prefill * pg.price_per_hour
        dg = get_gpu(self.decode_gpu, self.price_decode)
        return self.num_prefill * self.tp_prefill * pg.price_per_hour + self.num_decode * self.tp_decode * dg.price_per_hour

    def label(self) -> str:
        if self.mode == "colocated":
            return f"{self.num_colocated}x colocated {self.prefill_gpu} TP{self.tp_prefill}"
        return (f"{self.num_prefill}x prefill {self.prefill_gpu} TP{self.tp_prefill} + "
                f"{self.num_decode}x decode {self.decode_gpu} TP{self.tp_decode}")


def with_workers(data: dict[str, Any], mode: str | None, prefill: int | None, decode: int | None,
                 colocated: int | None) -> dict[str, Any]:
    """Cluster data with these worker counts; mode 'colocated' zeroes prefill and decode (and
    gives at least one colocated worker), mode 'disagg' zeroes colocated."""
    counts = {r: (data.get(r) or {}).get("workers") for r in ("prefill", "decode", "colocated")}
    counts.update({k: v for k, v in (("prefill", prefill), ("decode", decode), ("colocated", colocated))
                   if v is not None})
    if mode == "colocated":
        counts.update(prefill=0, decode=0, colocated=counts["colocated"] or 1)
    elif mode == "disagg":
        counts["colocated"] = 0
    elif mode is not None:
        raise ConfigError(f"mode: must be 'disagg' or 'colocated', got {mode!r}")
    return merge(data, {r: {"workers": n} for r, n in counts.items() if n is not None})


def step_model(cfg: SimConfig, shape: ModelShape, gpu_name: str, tp: int) -> StepTimeModel:
    if cfg.profile:
        return ProfiledModel.load(cfg.profile, cfg.mode if cfg.serving_overheads else None)
    return RooflineModel(shape, get_gpu(gpu_name), tp)


def _blocks(cfg: SimConfig, shape: ModelShape, gpu_name: str, tp: int) -> int:
    cache = cfg.cluster.cache
    if cache.num_blocks:
        return cache.num_blocks
    tokens = kv_capacity_tokens(shape, get_gpu(gpu_name), tp)
    if tokens < cache.block_size:
        raise ConfigError(f"{cfg.model} weights do not fit on {tp} x {gpu_name}: raise the TP degree "
                          "or pick a larger GPU")
    return tokens // cache.block_size


def _bm(n: int, cfg: SimConfig) -> BlockManager:
    # Tokens are fake (all 0): prefix caching would "hit" on every prompt, so it is off.
    return BlockManager(n, cfg.cluster.cache.block_size, enable_prefix_caching=False)


def build_instances(cfg: SimConfig, shape: ModelShape | None = None) -> list[SimInstance]:
    shape = shape or resolve_shape(cfg.model)
    link = get_link(cfg.link)
    out: list[SimInstance] = []
    if cfg.mode == "colocated":
        model = step_model(cfg, shape, cfg.prefill_gpu, cfg.tp_prefill)
        n = _blocks(cfg, shape, cfg.prefill_gpu, cfg.tp_prefill)
        sc = cfg.cluster.colocated.policy()  # the very settings a colocated worker of `pdserve up` runs
        for k in range(cfg.num_colocated):
            port = Port(f"c{k}", link.effective_bandwidth * cfg.tp_prefill)
            out.append(SimInstance(f"colocated{k}", "colocated", ColocatedScheduler(sc, _bm(n, cfg)),
                                   model, port, cfg.tp_prefill))
        return out
    pm = step_model(cfg, shape, cfg.prefill_gpu, cfg.tp_prefill)
    pn = _blocks(cfg, shape, cfg.prefill_gpu, cfg.tp_prefill)
    pc = cfg.cluster.prefill.policy()
    for k in range(cfg.num_prefill):
        # One NIC per GPU: a TP instance's KV shards leave over tp links in parallel.
        port = Port(f"p{k}", link.effective_bandwidth * cfg.tp_prefill)
        out.append(SimInstance(f"prefill{k}", "prefill", PrefillBatcher(pc, _bm(pn, cfg)), pm, port,
                               cfg.tp_prefill))
    dm = step_model(cfg, shape, cfg.decode_gpu, cfg.tp_decode)
    dn = _blocks(cfg, shape, cfg.decode_gpu, cfg.tp_decode)
    dc = cfg.cluster.decode.policy()
    for k in range(cfg.num_decode):
        port = Port(f"d{k}", link.effective_bandwidth * cfg.tp_decode)
        out.append(SimInstance(f"decode{k}", "decode", DecodeScheduler(dc, _bm(dn, cfg)), dm, port,
                               cfg.tp_decode))
    return out


def request_overhead_s(cfg: SimConfig) -> float:
    """The profile's measured per-request serving overhead for cfg.mode (0 without one)."""
    if not (cfg.profile and cfg.serving_overheads):
        return 0.0
    return serving_overheads(json.loads(Path(cfg.profile).read_text()), cfg.mode)[1]


def share_host(instances: list[SimInstance]) -> None:
    """Make the instances each other's `peers` where their step model was measured with its
    cluster on one host (`ProfiledModel.shares_host`): what one computes slows the others."""
    for inst in instances:
        if getattr(inst.model, "shares_host", False):
            inst.peers = [x for x in instances if x is not inst]


def build(cfg: SimConfig) -> Simulator:
    shape = resolve_shape(cfg.model)
    # The router's policy with the file's router settings: what `pdserve up` would route by.
    routing = RoutingPolicy(disagg_threshold=cfg.cluster.router.disagg_threshold, decode_serves_whole=False,
                            routing=cfg.cluster.router.routing)
    instances = build_instances(cfg, shape)
    share_host(instances)
    return Simulator(instances, shape, get_link(cfg.link), cfg.layerwise,
                     request_overhead_s=request_overhead_s(cfg), routing=routing,
                     reserve_wait_s=cfg.cluster.router.reserve_wait_s,
                     stats_interval_s=cfg.cluster.router.stats_interval_s)
