"""KV-size and transfer-time calculators against hand-computed values."""

import pytest

from pdserve.config.model import CATALOG
from pdserve.sim.calculators import kv_size, layered_transfer, transfer_time
from pdserve.sim.commands import main
from pdserve.sim.hardware import GPUS, LINKS, get_link


def test_llama3_70b_kv() -> None:
    k = kv_size(CATALOG["llama-3-70b"], 2000)
    assert k.bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327_680
    assert k.bytes_per_token_mha == 2 * 80 * 64 * 128 * 2 == 2_621_440
    assert k.bytes_per_sequence == 655_360_000
    assert kv_size(CATALOG["llama-3-70b"], 1, "float32").bytes_per_token == 655_360


def test_transfer_time_hand_computed() -> None:
    link = get_link("rdma-100g")  # 100 Gb/s = 12.5e9 B/s, 90% efficiency, 20 us
    assert link.bandwidth == pytest.approx(12.5e9)
    assert transfer_time(655_360_000, link) == pytest.approx(20e-6 + 655_360_000 / (12.5e9 * 0.9))
    assert get_link("nvlink4").bandwidth == pytest.approx(450e9)  # 900 GB/s bidirectional / 2
    assert get_link("cx7-400g").bandwidth == pytest.approx(50e9)


def test_layered_overlap() -> None:
    link = get_link("rdma-100g")
    lt = layered_transfer(80e6, link, 80, prefill_s=1.0)  # 1 MB per layer: ~89 us each, prefill-bound
    assert not lt.link_bound
    assert lt.exposed_s == pytest.approx(1e6 / (12.5e9 * 0.9) + 20e-6)
    slow = layered_transfer(80e9, link, 80, prefill_s=0.1)  # link-bound: nearly the whole transfer
    assert slow.link_bound
    assert slow.total_s == pytest.approx(80e9 / (12.5e9 * 0.9) + 20e-6, rel=1e-3)


def test_catalog_sane() -> None:
    assert GPUS["h100"].bf16_flops == pytest.approx(989e12)
    assert all(g.mem_bw > 1e11 and g.mem_bytes >= 24e9 for g in GPUS.values())
    assert set(LINKS) >= {"nvlink4", "nvlink5", "pcie5", "cx7-400g", "eth-200g", "eth-100g", "eth-25g", "eth-10g"}


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kv-size", "--model", "llama-3-70b", "--tokens", "2000"]) == 0
    assert "327,680" in capsys.readouterr().out
    assert main(["transfer-time", "--bytes", "1e9", "--link", "eth-10g"]) == 0
    assert "ms" in capsys.readouterr().out
