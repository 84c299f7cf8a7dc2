"""Workload presets, arrival processes and trace loading."""

import math
import statistics
from pathlib import Path

import pytest

from pdserve.workload import PRESETS, RequestSpec, generate, length_dist, load_trace

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
if not TRACES.is_dir():
    TRACES = Path("/work/shared/traces")


def test_seeded_reproducible() -> None:
    a = generate("chatbot", 200, rate=5.0, seed=3)
    b = generate("chatbot", 200, rate=5.0, seed=3)
    c = generate("chatbot", 200, rate=5.0, seed=4)
    assert a == b
    assert a != c
    assert all(isinstance(r, RequestSpec) for r in a)


def test_lengths_independent_of_rate() -> None:
    a = generate("search", 50, rate=1.0, seed=1)
    b = generate("search", 50, rate=100.0, seed=1)
    assert [r.prompt_tokens for r in a] == [r.prompt_tokens for r in b]


@pytest.mark.parametrize("arrival,burst", [("poisson", 1.0), ("gamma", 1.0), ("gamma", 4.0), ("gamma", 0.25)])
def test_arrival_rate_within_tolerance(arrival: str, burst: float) -> None:
    reqs = generate("search", 20000, rate=10.0, arrival=arrival, burstiness=burst, seed=0)
    measured = (len(reqs) - 1) / reqs[-1].arrival_s
    assert measured == pytest.approx(10.0, rel=0.06)
    assert reqs[0].arrival_s == 0.0
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(reqs, reqs[1:], strict=False))


def test_burstiness_raises_gap_variance() -> None:
    def cv(b: float) -> float:
        r = generate("search", 5000, rate=10.0, arrival="gamma", burstiness=b, seed=2)
        gaps = [y.arrival_s - x.arrival_s for x, y in zip(r, r[1:], strict=False)]
        return statistics.pstdev(gaps) / statistics.mean(gaps)

    assert cv(4.0) > 1.5 > cv(1.0) > 0.8 > cv(0.25)


def test_rate_inf_all_at_zero() -> None:
    assert {r.arrival_s for r in generate("search", 10, rate=math.inf)} == {0.0}


def test_preset_ranges() -> None:
    for name in ("search", "chatbot", "summarization", "search-small", "chatbot-small", "summarization-small"):
        spec = PRESETS[name]
        for r in generate(name, 300, rate=1.0, seed=5):
            assert spec.prompt.lo <= r.prompt_tokens <= spec.prompt.hi
            assert spec.output.lo <= r.output_tokens <= spec.output.hi
        if name.endswith("-small"):
            assert spec.prompt.hi + spec.output.hi <= 2048


def test_lognormal_dist() -> None:
    import random

    d = length_dist("lognormal", 10, 5000, median=500, sigma=0.7)
    xs = [d.sample(random.Random(i)) for i in range(4000)]
    assert 10 <= min(xs) and max(xs) <= 5000
    assert statistics.median(xs) == pytest.approx(500, rel=0.1)
    with pytest.raises(ValueError):
        length_dist("zipf", 1, 2)
    with pytest.raises(ValueError):
        generate("nope", 1, 1.0)


def test_traces_load() -> None:
    conv = load_trace(TRACES / "azure2023_conv.csv")
    code = load_trace(TRACES / "azure2023_code.csv")
    assert len(conv) == 19366
    assert len(code) == 8819
    assert conv[0] == RequestSpec(0.0, 374, 44)
    assert 1100 < statistics.mean(r.prompt_tokens for r in conv) < 1200


def test_trace_scaling_and_caps() -> None:
    base = load_trace(TRACES / "azure2023_conv.csv")[:100]
    fast = load_trace(TRACES / "azure2023_conv.csv", time_scale=0.5, length_scale=0.5,
                      max_prompt_tokens=256, max_output_tokens=32)[:100]
    assert fast[-1].arrival_s == pytest.approx(base[-1].arrival_s * 0.5)
    assert max(r.prompt_tokens for r in fast) <= 256 and max(r.output_tokens for r in fast) <= 32
    assert fast[0].prompt_tokens == round(374 * 0.5)


def test_generate_from_trace() -> None:
    path = TRACES / "azure2023_conv.csv"
    replay = generate("search", 50, rate=1.0, arrival="trace", trace=path)
    assert replay == load_trace(path)[:50]
    retimed = generate("search", 50, rate=100.0, arrival="poisson", trace=path, seed=1)
    assert [r.prompt_tokens for r in retimed] == [r.prompt_tokens for r in replay]
    assert retimed[-1].arrival_s < replay[-1].arrival_s


def test_length_only_csv_takes_arrivals_from_the_process(tmp_path: Path) -> None:
    path = tmp_path / "arxiv.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n900,40\n1200,80\n700,60\n")
    assert [(r.prompt_tokens, r.output_tokens) for r in load_trace(path)] == [(900, 40), (1200, 80), (700, 60)]
    specs = generate("search", 0, rate=2.0, arrival="poisson", trace=path, seed=3)
    assert [r.prompt_tokens for r in specs] == [900, 1200, 700]  # file order kept
    assert specs[0].arrival_s == 0.0 and specs[1].arrival_s < specs[2].arrival_s
    with pytest.raises(ValueError, match="no arrival times"):
        generate("search", 0, rate=1.0, arrival="trace", trace=path)


def test_mooncake_jsonl_keeps_hash_ids_and_times(tmp_path: Path) -> None:
    path = tmp_path / "mooncake.jsonl"
    path.write_text('{"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48]}\n'
                    '{"timestamp": 30535, "input_length": 1000, "output_length": 5, "hash_ids": [46, 99]}\n')
    replay = generate("search", 0, rate=1.0, arrival="trace", trace=path, length_scale=0.5)
    assert replay[0] == RequestSpec(0.0, 3478, 26, (46, 47, 48))
    assert replay[1].arrival_s == pytest.approx(3.053) and replay[1].hash_ids == (46, 99)
    retimed = generate("search", 0, rate=5.0, arrival="poisson", trace=path)
    assert [r.hash_ids for r in retimed] == [(46, 47, 48), (46, 99)]
    path.write_text('{"timestamp": 1, "input_length": "x"}\n')
    with pytest.raises(ValueError, match="mooncake.jsonl:1"):
        load_trace(path)
