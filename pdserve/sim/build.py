"""From a cluster description to SimInstances holding real `sched/` policies."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pdserve.config.engine import DecodeConfig, PrefillConfig, SchedulerConfig
from pdserve.config.model import ModelShape, resolve_shape
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.colocated import ColocatedScheduler
from pdserve.sched.decode import DecodeScheduler
from pdserve.sched.prefill import PrefillBatcher
from pdserve.sim.cluster import Simulator
from pdserve.sim.hardware import get_gpu, get_link
from pdserve.sim.instance import SimInstance
from pdserve.sim.network import Port
from pdserve.sim.perf_model import RooflineModel, StepTimeModel, kv_capacity_tokens
from pdserve.sim.profile import ProfiledModel, serving_overheads


@dataclass
class ClusterConfig:
    """A cluster to simulate. mode: 'disagg' (P prefill + D decode) or 'colocated' (N instances)."""

    model: str = "llama-3.1-8b"
    mode: str = "disagg"
    num_prefill: int = 1
    num_decode: int = 1
    num_colocated: int = 1
    prefill_gpu: str = "h100"
    decode_gpu: str = "h100"  # colocated instances use prefill_gpu
    tp_prefill: int = 1
    tp_decode: int = 1
    link: str = "cx7-400g"
    block_size: int = 16
    num_blocks: int = 0  # 0: what fits beside the weights (per instance)
    chunk_tokens: int = 2048  # colocated: per-step token budget (chunked prefill)
    max_num_seqs: int = 256
    prefill_batch_tokens: int = 8192
    prefill_max_wait_ms: float = 5.0
    profile: str | None = None  # a measured profile replaces the roofline
    serving_overheads: bool = True  # with a profile: add its measured serving overheads (pdserve calibrate)
    layerwise: bool = True  # KV streamed per layer during prefill
    price_prefill: float | None = None
    price_decode: float | None = None

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


def step_model(cfg: ClusterConfig, shape: ModelShape, gpu_name: str, tp: int) -> StepTimeModel:
    if cfg.profile:
        return ProfiledModel.load(cfg.profile, cfg.mode if cfg.serving_overheads else None)
    return RooflineModel(shape, get_gpu(gpu_name), tp)


def _blocks(cfg: ClusterConfig, shape: ModelShape, gpu_name: str, tp: int) -> int:
    if cfg.num_blocks:
        return cfg.num_blocks
    tokens = kv_capacity_tokens(shape, get_gpu(gpu_name), tp)
    if tokens < cfg.block_size:
        raise ValueError(f"{shape.architecture} weights do not fit on {tp} x {gpu_name}: raise TP")
    return tokens // cfg.block_size


def _bm(n: int, cfg: ClusterConfig) -> BlockManager:
    # Tokens are fake (all 0): prefix caching would "hit" on every prompt, so it is off.
    return BlockManager(n, cfg.block_size, enable_prefix_caching=False)


def build_instances(cfg: ClusterConfig, shape: ModelShape | None = None) -> list[SimInstance]:
    shape = shape or resolve_shape(cfg.model)
    link = get_link(cfg.link)
    out: list[SimInstance] = []
    if cfg.mode == "colocated":
        model = step_model(cfg, shape, cfg.prefill_gpu, cfg.tp_prefill)
        n = _blocks(cfg, shape, cfg.prefill_gpu, cfg.tp_prefill)
        sc = SchedulerConfig(max_num_batched_tokens=cfg.chunk_tokens, max_num_seqs=cfg.max_num_seqs)
        for k in range(cfg.num_colocated):
            port = Port(f"c{k}", link.effective_bandwidth * cfg.tp_prefill)
            out.append(SimInstance(f"colocated{k}", "colocated", ColocatedScheduler(sc, _bm(n, cfg)),
                                   model, port, cfg.tp_prefill))
        return out
    if cfg.mode != "disagg":
        raise ValueError(f"mode must be 'disagg' or 'colocated', got {cfg.mode!r}")
    pm = step_model(cfg, shape, cfg.prefill_gpu, cfg.tp_prefill)
    pn = _blocks(cfg, shape, cfg.prefill_gpu, cfg.tp_prefill)
    pc = PrefillConfig(max_batch_tokens=cfg.prefill_batch_tokens, max_wait_ms=cfg.prefill_max_wait_ms,
                       max_num_seqs=cfg.max_num_seqs)
    for k in range(cfg.num_prefill):
        # One NIC per GPU: a TP instance's KV shards leave over tp links in parallel.
        port = Port(f"p{k}", link.effective_bandwidth * cfg.tp_prefill)
        out.append(SimInstance(f"prefill{k}", "prefill", PrefillBatcher(pc, _bm(pn, cfg)), pm, port,
                               cfg.tp_prefill))
    dm = step_model(cfg, shape, cfg.decode_gpu, cfg.tp_decode)
    dn = _blocks(cfg, shape, cfg.decode_gpu, cfg.tp_decode)
    dc = DecodeConfig(max_batch_size=cfg.max_num_seqs, max_num_seqs=2 * cfg.max_num_seqs,
                      max_num_batched_tokens=cfg.chunk_tokens)
    for k in range(cfg.num_decode):
        port = Port(f"d{k}", link.effective_bandwidth * cfg.tp_decode)
        out.append(SimInstance(f"decode{k}", "decode", DecodeScheduler(dc, _bm(dn, cfg)), dm, port,
                               cfg.tp_decode))
    return out


def request_overhead_s(cfg: ClusterConfig) -> float:
    """The profile's measured per-request serving overhead for cfg.mode (0 without one)."""
    if not (cfg.profile and cfg.serving_overheads):
        return 0.0
    return serving_overheads(json.loads(Path(cfg.profile).read_text()), cfg.mode)[1]


def build(cfg: ClusterConfig) -> Simulator:
    shape = resolve_shape(cfg.model)
    return Simulator(build_instances(cfg, shape), shape, get_link(cfg.link), cfg.layerwise,
                     request_overhead_s=request_overhead_s(cfg))
