"""What structured outputs and penalties cost per decode step, beside plain sampling.

    .venv/bin/python bench/sampling_bench.py [--model demo] [--batch 16] [--steps 20] [--repeats 3]
                                             [--out bench/results/sampling_cost.json]

One engine (`LLM`, colocated policy), one batch of `--batch` seeded requests at temperature 1 kept in
steady decode; per configuration the batch is admitted, prefilled, and then `--steps` decode steps
are timed one by one (model + sampler, as `EngineCore.step` runs them). Configurations, interleaved
and repeated so that the shared machine's noise falls on all of them alike:

* plain: seeded temperature sampling;
* penalties: repetition 1.2, frequency 0.5, presence 0.5 and a 10-token logit_bias on every row;
* grammar 50% / 100%: that share of the rows constrained by a JSON schema (a long array of enums,
  so no row finishes inside the timed steps).

The sampler alone is timed too (`sample_rows` on random logits of this vocabulary and of a
128k one), to separate its cost from the model's. Medians and ratios to plain go to JSON with
the raw step times, the machine and its load average; a PNG shows the step medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine_bench import machine_info  # noqa: E402
from pdserve.engine.grammar import GuidedSpec  # noqa: E402
from pdserve.engine.llm import LLM  # noqa: E402
from pdserve.engine.sampler import Row, SamplingParams, sample_rows  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["items"],
          "properties": {"items": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]},
                                   "minItems": 500, "maxItems": 500}}}
CONFIGS = ["plain", "penalties", "grammar_50", "grammar_100"]


def params_for(config: str, row: int, batch: int, max_tokens: int) -> SamplingParams:
    p: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 1.0, "seed": row, "ignore_eos": True}
    if config == "penalties":
        p.update(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5,
                 logit_bias={t: 1.0 for t in range(100, 110)})
    share = {"grammar_50": 0.5, "grammar_100": 1.0}.get(config, 0.0)
    if row < round(share * batch):
        p.update(guided=GuidedSpec("json_schema", json.dumps(SCHEMA)), ignore_eos=False)
    return SamplingParams(**p)


def step_times(llm: LLM, config: str, batch: int, steps: int, prompt_len: int, tag: str) -> list[float]:
    core = llm.core
    for i in range(batch):
        ids = [(7 * i + 13 * j) % 3000 + 3 for j in range(prompt_len)]
        core.add(core.make_request(f"{tag}-{i}", ids, params_for(config, i, batch, steps + 8)))
    while llm.scheduler.num_waiting or any(r.is_prefill for r in llm.scheduler.running):  # type: ignore[attr-defined]
        core.step()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        res = core.step()
        out.append(time.perf_counter() - t0)
        assert len(res.new_tokens) == batch, "a row finished or was preempted inside the timed steps"
    for i in range(batch):
        llm.scheduler.abort(f"{tag}-{i}", core.clock())
    return out


def sampler_times(vocab: int, batch: int, config: str, reps: int) -> list[float]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=g)
    hist = [list(range(i, i + 64)) for i in range(batch)]
    rows = [Row(params_for(config, i, batch, 64), step=5, output_ids=hist[i], context_ids=hist[i]) for i in range(batch)]
    if config.startswith("grammar"):
        return []  # the grammar needs a tokenizer of this vocabulary: timed in the engine steps only
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sample_rows(logits, rows)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="bench/results/sampling_cost.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    llm = LLM(a.model, kv_cache_memory_gb=0.25, enable_prefix_caching=False)
    load_before = list(__import__("os").getloadavg())
    raw: dict[str, list[float]] = {c: [] for c in CONFIGS}
    step_times(llm, "grammar_100", a.batch, 2, a.prompt_len, "warm")  # compile the grammar, warm caches
    for rep in range(a.repeats):
        for c in CONFIGS:
            raw[c] += step_times(llm, c, a.batch, a.steps, a.prompt_len, f"{c}-{rep}")
    sampler = {f"{c}_vocab{v}": sampler_times(v, a.batch, c, 20) for v in (llm.runner.shape.vocab_size, 128256)
               for c in ("plain", "penalties")}
    med = {c: statistics.median(v) for c, v in raw.items()}
    result = {
        "command": " ".join(sys.argv),
        "machine": machine_info("cpu"),
        "loadavg_before": load_before,
        "model": a.model, "batch": a.batch, "steps_per_config_per_repeat": a.steps, "repeats": a.repeats,
        "prompt_len": a.prompt_len,
        "decode_step_median_s": med,
        "ratio_to_plain": {c: med[c] / med["plain"] for c in CONFIGS},
        "sampler_only_median_s": {k: statistics.median(v) for k, v in sampler.items() if v},
        "peer": "plain: the same engine, batch and seeds without penalties or grammar",
        "raw_step_s": raw,
        "raw_sampler_s": sampler,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    for c in CONFIGS:
        print(f"{c:12s} step median {med[c] * 1e3:7.2f} ms  x{med[c] / med['plain']:.2f} of plain")
    for k, v in result["sampler_only_median_s"].items():
        print(f"sampler {k:24s} {v * 1e3:7.2f} ms")
    plot(result, Path(a.out).with_suffix(".png"))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = result["decode_step_median_s"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(list(med), [v * 1e3 for v in med.values()], color=["grey", "tab:orange", "tab:blue", "tab:blue"])
    for i, c in enumerate(med):
        ax.text(i, med[c] * 1e3, f"x{result['ratio_to_plain'][c]:.2f}", ha="center", va="bottom")
    ax.set_ylabel("decode step, median (ms)")
    m = result["machine"]
    ax.set_title(f"{result['model']}, batch {result['batch']}, {m['cpu_model'][:40]}; load {m['loadavg_1_5_15'][0]:.1f}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
