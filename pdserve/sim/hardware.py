"""Hardware catalog: GPUs and links, with the datasheet each number comes from.

Units are SI and explicit: FLOP/s, bytes/s (never bits), bytes. Link bandwidth is **per direction**
(a KV transfer flows one way). FLOP/s are **dense** BF16 tensor-core peaks: NVIDIA datasheets print
the 2:4-sparsity figure first, which is twice the dense one.
Prices are rough 2025 on-demand cloud rates per GPU-hour; override them (`--price GPU=USD`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9
TB = 1e12
TFLOPS = 1e12
GBIT = 1e9 / 8  # bytes/s in one Gb/s


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense peak FLOP/s
    mem_bw: float  # HBM/GDDR bytes/s
    mem_bytes: float  # device memory, bytes
    price_per_hour: float  # USD per GPU-hour (override)
    tp_link: str  # link used for tensor-parallel all-reduce inside a node
    max_tp: int = 8


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s per direction (raw signalling rate)
    latency_s: float  # base latency per transfer: wire + NIC/driver + handshake
    efficiency: float = 0.9  # achievable share of `bandwidth` for large transfers
    protocol: str = "rdma"

    @property
    def effective_bandwidth(self) -> float:
        return self.bandwidth * self.efficiency


GPUS: dict[str, GPU] = {
    # H100 SXM5 datasheet (nvidia.com/en-us/data-center/h100): BF16 1,979 TFLOPS with sparsity
    # -> 989 dense; HBM3 3.35 TB/s; 80 GB; NVLink 900 GB/s (bidirectional).
    "h100": GPU("H100 SXM", 989 * TFLOPS, 3.35 * TB, 80 * GB, 3.00, "nvlink4"),
    # H200 SXM datasheet (nvidia.com/en-us/data-center/h200): same compute as H100 (989 dense);
    # HBM3e 4.8 TB/s; 141 GB.
    "h200": GPU("H200 SXM", 989 * TFLOPS, 4.8 * TB, 141 * GB, 3.80, "nvlink4"),
    # A100 80GB SXM datasheet (nvidia.com/en-us/data-center/a100): BF16 312 TFLOPS dense
    # (624 sparse); HBM2e 2,039 GB/s; 80 GB; NVLink 3 600 GB/s bidirectional.
    "a100": GPU("A100 80GB SXM", 312 * TFLOPS, 2.039 * TB, 80 * GB, 1.80, "nvlink3"),
    # L40S datasheet (nvidia.com/en-us/data-center/l40s): BF16 362.05 TFLOPS dense (733 sparse);
    # GDDR6 864 GB/s; 48 GB; no NVLink (PCIe Gen4 x16).
    "l40s": GPU("L40S", 362 * TFLOPS, 864 * GB, 48 * GB, 1.00, "pcie4", max_tp=4),
    # A10 datasheet (nvidia.com/en-us/data-center/products/a10-gpu): BF16 125 TFLOPS dense (250
    # sparse); GDDR6 600 GB/s; 24 GB. AWS's A10G is a lower-clocked variant: its tensor peak is
    # quoted around 70 TFLOPS in third-party measurements, so we take 70 (uncertain; override by
    # fitting a profile). PCIe Gen4.
    "a10g": GPU("A10G", 70 * TFLOPS, 600 * GB, 24 * GB, 1.01, "pcie4", max_tp=4),
    # HGX B200 datasheet (nvidia.com/en-us/data-center/hgx): FP16/BF16 4.5 PFLOPS sparse per GPU
    # -> 2.25 dense; HBM3e 8 TB/s; 180 GB per GPU in HGX B200; NVLink 5 1.8 TB/s bidirectional.
    "b200": GPU("B200", 2250 * TFLOPS, 8.0 * TB, 180 * GB, 6.00, "nvlink5"),
}

LINKS: dict[str, Link] = {
    # NVLink 4 (H100): 900 GB/s total = 450 GB/s per direction (H100 datasheet). Base latency:
    # a CUDA IPC copy launch, ~10 us.
    "nvlink4": Link("NVLink 4", 450 * GB, 10e-6, 0.8, "nvlink"),
    # NVLink 5 (B200): 1.8 TB/s total = 900 GB/s per direction (HGX B200 datasheet).
    "nvlink5": Link("NVLink 5", 900 * GB, 10e-6, 0.8, "nvlink"),
    # NVLink 3 (A100): 600 GB/s total = 300 GB/s per direction (A100 datasheet).
    "nvlink3": Link("NVLink 3", 300 * GB, 10e-6, 0.8, "nvlink"),
    # PCIe 5.0 x16: 32 GT/s x 16 lanes = 512 Gb/s = 64 GB/s per direction before encoding
    # (PCI-SIG PCIe 5.0 spec); ~80% achievable with DMA.
    "pcie5": Link("PCIe 5.0 x16", 64 * GB, 10e-6, 0.8, "pcie"),
    # PCIe 4.0 x16: 16 GT/s x 16 = 32 GB/s per direction (PCI-SIG PCIe 4.0 spec).
    "pcie4": Link("PCIe 4.0 x16", 32 * GB, 10e-6, 0.8, "pcie"),
    # ConnectX-7: 400 Gb/s per port (NVIDIA ConnectX-7 datasheet) = 50 GB/s per direction.
    # RDMA (InfiniBand NDR / RoCE) one-way latency is a few us; ~20 us with transfer setup.
    "cx7-400g": Link("ConnectX-7 400 Gb/s RDMA", 400 * GBIT, 20e-6, 0.9, "rdma"),
    # 100 Gb/s RDMA (ConnectX-6 class, RoCE): the seed's "100 Gbps RDMA" = 12.5 GB/s.
    "rdma-100g": Link("100 Gb/s RDMA", 100 * GBIT, 20e-6, 0.9, "rdma"),
    # Ethernet with kernel TCP (IEEE 802.3 rates): 1 Gb/s = 0.125 GB/s. TCP adds copies and a
    # handshake: ~100 us base, ~70% of line rate for one stream on a tuned host.
    "eth-200g": Link("200 GbE (TCP)", 200 * GBIT, 100e-6, 0.7, "tcp"),
    "eth-100g": Link("100 GbE (TCP)", 100 * GBIT, 100e-6, 0.7, "tcp"),
    "eth-25g": Link("25 GbE (TCP)", 25 * GBIT, 100e-6, 0.7, "tcp"),
    "eth-10g": Link("10 GbE (TCP)", 10 * GBIT, 100e-6, 0.7, "tcp"),
}


def get_gpu(name: str, price: float | None = None) -> GPU:
    key = name.lower().replace(" ", "").replace("-", "")
    aliases = {"h100sxm": "h100", "a10080gb": "a100", "a100": "a100"}
    key = aliases.get(key, key)
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    gpu = GPUS[key]
    return replace(gpu, price_per_hour=price) if price is not None else gpu


def get_link(name: str) -> Link:
    if name not in LINKS:
        raise ValueError(f"unknown link {name!r}; known: {', '.join(LINKS)}")
    return LINKS[name]


def parse_prices(items: list[str] | None) -> dict[str, float]:
    """['h100=2.5', 'a100=1.2'] -> {'h100': 2.5, 'a100': 1.2}."""
    out: dict[str, float] = {}
    for item in items or []:
        name, _, value = item.partition("=")
        if not value:
            raise ValueError(f"--price expects GPU=USD_PER_HOUR, got {item!r}")
        get_gpu(name)  # validate the name
        out[name.lower()] = float(value)
    return out
