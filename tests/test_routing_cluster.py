"""Prefix-aware routing and hedged prefill over real worker processes (one set shared by the module):
two normal colocated workers and one slowed by fault injection (`fault_prompt_delay_ms`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from pdserve.config.model import resolve_shape
from pdserve.config.schema import RouterConfig
from pdserve.engine.sampler import SamplingParams
from pdserve.serve.router import ClusterBackend
from tests.servers import Server, start_workers

pytestmark = pytest.mark.slow
SECRET = "routing-cluster"
SLOW_MS = 2500
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(tiny_models) -> Iterator[dict[str, object]]:  # type: ignore[no-untyped-def]
    model = str(tiny_models["llama"])
    env = {"PDSERVE_CLUSTER_SECRET": SECRET}
    procs: list[Server] = []
    try:
        procs += start_workers([("colocated", model, "--num-blocks", "64", *extra)
                                for extra in ((), (), ("--fault-prompt-delay-ms", str(SLOW_MS)))], env=env)
        yield {"model": model, "fast": [p.url for p in procs[:2]], "slow": procs[2].url}
    finally:
        for p in procs:
            p.stop(0)


async def _run(model: str, workers: list[str], cfg: RouterConfig, prompts: list[list[int]],
               concurrent: bool = False) -> tuple[ClusterBackend, list[tuple[list[int], int, dict[str, float]]]]:
    """Each prompt's (tokens, cached prompt tokens, final timings); sequential unless `concurrent`."""
    be = ClusterBackend(resolve_shape(model), [], [], workers, secret=SECRET.encode(), config=cfg)
    await be.start()

    async def one(k: int, p: list[int]) -> tuple[list[int], int, dict[str, float]]:
        toks: list[int] = []
        cached, timings = 0, {}
        async for ev in be.generate(f"q{k}", p, PARAMS):
            toks += ev.token_ids
            if ev.finish_reason is not None:
                cached, timings = ev.num_cached_tokens, ev.timings
        await asyncio.sleep(2.5 * cfg.stats_interval_s)  # its blocks' events reach the router
        return toks, cached, timings

    try:
        if concurrent:
            out = list(await asyncio.gather(*(one(k, p) for k, p in enumerate(prompts))))
        else:
            out = [await one(k, p) for k, p in enumerate(prompts)]
        await asyncio.sleep(0.3)
        await asyncio.gather(*(w.heartbeat() for w in be.workers))
        return be, out
    finally:
        await be.stop()


def _family(base: int, n: int) -> list[list[int]]:
    shared = [(base + 7 * i) % 250 + 3 for i in range(64)]  # 4 full blocks of 16
    return [shared + [(base + k * 13 + j) % 250 + 3 for j in range(5)] for k in range(n)]


def test_prefix_aware_sends_a_shared_prefix_where_it_is_cached(cluster) -> None:  # type: ignore[no-untyped-def]
    model, fast = cluster["model"], cluster["fast"]
    _, pa = asyncio.run(_run(model, fast, RouterConfig(routing="prefix_aware"), _family(11, 5)))
    assert [c for _, c, _ in pa[1:]] == [64] * 4  # every follower found the prefix (4 blocks) cached
    # least_loaded takes turns between the idle workers: a follower lands where the prefix is not
    _, ll = asyncio.run(_run(model, fast, RouterConfig(routing="least_loaded"), _family(101, 5)))
    assert 0 in [c for _, c, _ in ll[1:]]


def test_hedging_beats_a_slow_worker_with_identical_output_and_frees_everything(cluster) -> None:  # type: ignore[no-untyped-def]
    model, fast, slow = cluster["model"], cluster["fast"], cluster["slow"]
    prompts = [[(k * 31 + j * 7) % 250 + 3 for j in range(24)] for k in range(6)]
    _, ref = asyncio.run(_run(model, fast[:1], RouterConfig(), prompts))
    cfg = RouterConfig(hedge_after_ms=300, hedge_max_fraction=0.5)
    be, hedged = asyncio.run(_run(model, [slow, fast[0]], cfg, prompts))
    assert [t for t, _, _ in hedged] == [t for t, _, _ in ref]  # the same tokens, once each
    assert 1 <= be.hedges <= 0.5 * len(prompts) and be.hedge_wins == be.hedges
    assert all(t.get("hedged") for _, _, t in hedged[1:] if t.get("hedge_won"))
    for w in be.workers:  # the losers were dropped on the slow worker: every block back, nothing queued
        assert w.load.free_blocks == w.load.total_blocks and w.load.running == 0, w.name
    # no slow worker: nothing is late, nothing is hedged (late: 5 s, which no 24-token prompt on a
    # fast worker takes even on a loaded machine; a hedge sent regardless of lateness still shows)
    be, _ = asyncio.run(_run(model, fast, RouterConfig(hedge_after_ms=5000, hedge_max_fraction=0.5), prompts))
    assert be.hedges == 0
