"""One RoutingPolicy object drives the real router (over real worker processes) and then the
simulator, and both reject a request (503) when the only decode worker cannot reserve for it."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import pytest

from pdserve.config.engine import DecodeConfig, PrefillConfig
from pdserve.config.model import CATALOG, resolve_shape
from pdserve.engine.sampler import SamplingParams
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.decode import DecodeScheduler
from pdserve.sched.prefill import PrefillBatcher
from pdserve.sched.routing import RoutingPolicy
from pdserve.serve.backend import BackendError
from pdserve.serve.router import ClusterBackend
from pdserve.sim.cluster import Simulator
from pdserve.sim.hardware import get_link
from pdserve.sim.instance import SimInstance
from pdserve.sim.network import Port
from pdserve.workload import RequestSpec
from tests.servers import Server, start_workers
from tests.test_sim import FixedModel

pytestmark = pytest.mark.slow
SECRET = "routing-shared"


def _counted(policy: RoutingPolicy) -> Counter[str]:
    calls: Counter[str] = Counter()
    for name in ("route", "prefill_for", "refused"):
        method = getattr(policy, name)

        def wrapped(*a, _m=method, _n=name, **k):  # type: ignore[no-untyped-def]
            calls[_n] += 1
            return _m(*a, **k)

        setattr(policy, name, wrapped)
    return calls


def test_one_routing_policy_object_in_the_router_and_in_the_simulator(tiny_models) -> None:  # type: ignore[no-untyped-def]
    policy = RoutingPolicy(decode_serves_whole=False)
    calls = _counted(policy)
    model = str(tiny_models["llama"])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    procs: list[Server] = []
    try:
        procs += start_workers([("prefill", model), ("decode", model, "--max-batch-size", "1", "--min-batch-size",
                                                      "1", "--max-num-seqs", "1")],
                               env={"PDSERVE_CLUSTER_SECRET": SECRET})  # side by side
        prefill, decode = (p.url for p in procs)

        async def real() -> list[int]:
            backend = ClusterBackend(resolve_shape(model), [prefill], [decode], [], secret=SECRET.encode(),
                                     policy=policy)
            await backend.start()
            try:
                a = backend.generate("a", [5, 6, 7, 8], params)
                tokens = list((await anext(a)).token_ids)  # a holds the decode worker's one slot
                with pytest.raises(BackendError) as refused:
                    await anext(backend.generate("b", [9, 10, 11], params))
                assert refused.value.status == 503 and "full" in str(refused.value)
                async for ev in a:
                    tokens += ev.token_ids
                return tokens
            finally:
                await backend.stop()

        assert len(asyncio.run(real())) == 6
    finally:
        for p in procs:
            p.stop(0)
    assert calls == Counter(route=2, prefill_for=1, refused=1)

    # The same object in the simulator: a second request while the first holds the only decode
    # slot is rejected there too (the simulator used to queue it at the router), a later one is served.
    pre = SimInstance("prefill0", "prefill", PrefillBatcher(PrefillConfig(), BlockManager(64, 16, False)),
                      FixedModel(), Port("p0", 1e9))
    dec = SimInstance("decode0", "decode",
                      DecodeScheduler(DecodeConfig(max_batch_size=1, max_num_seqs=1, min_batch_size=1), BlockManager(64, 16, False)),
                      FixedModel(), Port("d0", 1e9))
    sim = Simulator([pre, dec], CATALOG["demo"], get_link("cx7-400g"), routing=policy)
    r = sim.run([RequestSpec(0.0, 20, 6), RequestSpec(0.001, 20, 6), RequestSpec(5.0, 20, 6)])
    assert r.num_rejected == 1
    assert math.isnan(r.finish[1]) and math.isfinite(r.finish[0]) and math.isfinite(r.finish[2])
    assert calls == Counter(route=5, prefill_for=3, refused=2)


def test_simulator_rejects_what_no_decode_instance_can_reserve_and_finishes_the_rest() -> None:
    """Tight decode KV under load: the simulator used to queue such requests at the router; now,
    as the real router, it rejects them, and every other request finishes."""
    from pdserve.sim.build import GPU_SCALE, SimConfig, build
    from pdserve.sim.metrics import summarize
    from pdserve.workload import generate

    # The router's default wait for room (5 s): requests the decode pool cannot take at once are
    # retried there; under this KV thrash a decode instance used to stall for good with a preempted
    # request at the head of its queue behind the blocks of ready ones (sched/decode.py).
    cfg = SimConfig.of(model="llama-3.1-8b", mode="disagg", num_prefill=1, num_decode=3,
                       serving={**GPU_SCALE, "cache": {"num_blocks": 600}})
    assert cfg.cluster.router.reserve_wait_s > 0
    specs = generate("chatbot", 300, rate=20.0, seed=3)
    r = build(cfg).run(specs)
    res = summarize(r)
    assert 0 < r.num_rejected < len(specs)
    assert res["num_rejected"] == r.num_rejected
    assert res["completed"] + r.num_rejected == len(specs)  # nothing stuck
