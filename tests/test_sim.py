"""Simulator on tiny hand-checkable scenarios, driving the real sched/ policies."""

import copy
import math

import pytest

from pdserve.config.engine import SchedulerConfig
from pdserve.config.load import merge
from pdserve.config.model import CATALOG
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.colocated import ColocatedScheduler
from pdserve.sim.build import GPU_SCALE, SimConfig, build, build_instances
from pdserve.sim.cluster import Simulator
from pdserve.sim.events import EventLoop
from pdserve.sim.hardware import Link, get_link
from pdserve.sim.instance import SimInstance
from pdserve.sim.metrics import SLO, summarize
from pdserve.sim.network import Network, Port
from pdserve.sim.profile import ProfiledModel
from pdserve.workload import RequestSpec, generate


class FixedModel:
    """Prefill: 1 ms per token; decode: 10 ms per step; mixed: sum."""

    def prefill_time(self, token_counts: list[int]) -> float:
        return 1e-3 * sum(token_counts)

    def decode_time(self, context_lens: list[int]) -> float:
        return 10e-3

    def mixed_time(self, prefill_chunks: list[tuple[int, int]], decode_contexts: list[int]) -> float:
        return 1e-3 * sum(n for n, _ in prefill_chunks) + (10e-3 if decode_contexts else 0.0)


def _colocated(policy: ColocatedScheduler) -> Simulator:
    inst = SimInstance("c0", "colocated", policy, FixedModel(), Port("c0", 1e9))
    return Simulator([inst], CATALOG["demo"], get_link("cx7-400g"))


def test_one_request_colocated_hand_checked() -> None:
    policy = ColocatedScheduler(SchedulerConfig(max_num_batched_tokens=1000), BlockManager(100, 16, False))
    r = _colocated(policy).run([RequestSpec(0.0, 100, 5)])
    # prefill 100 tokens = 100 ms (samples token 1), then 4 decode steps of 10 ms.
    assert r.first_token[0] == pytest.approx(0.100)
    assert r.finish[0] == pytest.approx(0.140)
    assert list(r.itls) == pytest.approx([0.010] * 4)
    assert r.max_itl == pytest.approx([0.010])


def test_same_policy_object_is_stepped() -> None:
    """The sim steps the very ColocatedScheduler instance the engine would use."""
    policy = ColocatedScheduler(SchedulerConfig(max_num_batched_tokens=64), BlockManager(100, 16, False))
    calls = {"schedule": 0, "update": 0}
    sched, upd = policy.schedule, policy.update

    def schedule(now: float):  # type: ignore[no-untyped-def]
        calls["schedule"] += 1
        return sched(now)

    def update(out, sampled, now):  # type: ignore[no-untyped-def]
        calls["update"] += 1
        return upd(out, sampled, now)

    policy.schedule, policy.update = schedule, update  # type: ignore[method-assign]
    inst = SimInstance("c0", "colocated", policy, FixedModel(), Port("c0", 1e9))
    # runs=False: one schedule/update per step, as the engine makes them (runs: test_runs_equal_*)
    r = Simulator([inst], CATALOG["demo"], get_link("cx7-400g"), runs=False).run([RequestSpec(0.0, 100, 3)])
    # chunked prefill: 64 + 36 tokens (2 steps), then 2 decode steps
    assert calls["update"] == 4
    assert calls["schedule"] >= 4
    assert r.first_token[0] == pytest.approx(0.100)
    assert policy.num_running == 0 and policy.block_manager.num_free_blocks == 100


def test_two_requests_contend() -> None:
    policy = ColocatedScheduler(SchedulerConfig(max_num_batched_tokens=100), BlockManager(100, 16, False))
    r = _colocated(policy).run([RequestSpec(0.0, 100, 2), RequestSpec(0.0, 100, 2)])
    # Budget 100: A prefills alone (100 ms); then A decodes + B prefills 99 tokens? No: decode first
    # (1 token) + B's chunk of 99 -> 109 ms; then A done? A had 2 outputs: done at 0.209.
    assert r.first_token[0] == pytest.approx(0.100)
    assert r.finish[0] == pytest.approx(0.209)
    assert r.first_token[1] > r.first_token[0]


def test_disagg_one_request_includes_transfer() -> None:
    cfg = SimConfig.of(model="llama-3.1-8b", mode="disagg", link="eth-10g", layerwise=False)
    sim = build(cfg)
    r = sim.run([RequestSpec(0.0, 1000, 3)])
    # The PrefillBatcher waits max_wait_ms for a fuller batch before starting alone.
    pre = cfg.cluster.prefill.max_wait_ms / 1e3 + sim.prefill[0].model.prefill_time([1000])
    link = get_link("eth-10g")
    xfer = 1000 * CATALOG["llama-3.1-8b"].kv_bytes_per_token() / (link.effective_bandwidth * 1) + link.latency_s
    dec = sim.decode[0].model.decode_time([1001])
    assert r.first_token[0] == pytest.approx(pre)
    assert list(r.itls)[0] == pytest.approx(xfer + dec, rel=1e-6)
    assert r.finish[0] == pytest.approx(pre + xfer + dec + sim.decode[0].model.decode_time([1002]))


def test_saturated_link_shares_bandwidth() -> None:
    loop = EventLoop()
    net = Network(loop)
    src, dst1, dst2 = Port("s", 100.0), Port("a", 1000.0), Port("b", 1000.0)
    done: dict[str, float] = {}
    net.start(src, dst1, 100.0, 0.0, lambda t: done.__setitem__("a", t), 0.0)
    net.start(src, dst2, 100.0, 0.5, lambda t: done.__setitem__("b", t), 0.0)
    loop.run()
    # Two transfers share 100 B/s: each gets 50 B/s -> 2 s (+0.5 s latency for b).
    assert done["a"] == pytest.approx(2.0)
    assert done["b"] == pytest.approx(2.5)
    assert src.utilization(2.0)["bandwidth_util"] == pytest.approx(1.0)


def test_late_transfer_rerated() -> None:
    loop = EventLoop()
    net = Network(loop)
    src, dst = Port("s", 100.0), Port("d", 100.0)
    done: dict[str, float] = {}
    net.start(src, dst, 100.0, 0.0, lambda t: done.__setitem__("a", t), 0.0)
    loop.at(0.5, lambda t: net.start(src, dst, 100.0, 0.0, lambda t2: done.__setitem__("b", t2), t))
    loop.run()
    # a: 50 B alone in 0.5 s, then 50 B at 50 B/s -> 1.5 s. b: 50 B by 1.5 s, 50 B alone -> 2.0 s.
    assert done["a"] == pytest.approx(1.5)
    assert done["b"] == pytest.approx(2.0)


@pytest.mark.parametrize("mode", ["disagg", "colocated"])
def test_small_cluster_all_finish_and_metrics(mode: str) -> None:
    cfg = SimConfig.of(model="llama-3.1-8b", mode=mode, num_prefill=1, num_decode=2, num_colocated=2,
                       serving=GPU_SCALE)
    specs = generate("chatbot", 60, rate=4.0, seed=1)
    res = summarize(build(cfg).run(specs), SLO(ttft_ms=2000, tpot_ms=100))
    assert res["completed"] == 60
    assert res["total_output_tokens"] == sum(s.output_tokens for s in specs)
    for key in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "p90_e2el_ms", "request_goodput"):
        assert math.isfinite(res[key])
    assert 0 < res["slo_attainment"] <= 1


def test_profiled_model_fit() -> None:
    prof = {"prefill": [[n, 0.01 + 1e-4 * n + 1e-8 * n * n] for n in (16, 64, 256, 1024)],
            "decode": [[b, c, 0.005 + 1e-4 * b + 1e-7 * b * c] for b in (1, 4, 16) for c in (128, 1024)]}
    m = ProfiledModel.fit(prof)
    assert m.prefill_time([512]) == pytest.approx(0.01 + 1e-4 * 512 + 1e-8 * 512**2, rel=1e-6)
    assert m.decode_time([1000] * 8) == pytest.approx(0.005 + 8e-4 + 1e-7 * 8000, rel=1e-6)
    assert m.mixed_time([(100, 0)], [500]) > m.decode_time([500])


def test_build_uses_sched_classes() -> None:
    from pdserve.sched.decode import DecodeScheduler
    from pdserve.sched.prefill import PrefillBatcher

    insts = build_instances(SimConfig.of(model="llama-3.1-8b", mode="disagg"))
    assert isinstance(insts[0].policy, PrefillBatcher) and isinstance(insts[1].policy, DecodeScheduler)
    assert Link  # catalog type importable for custom links


def _run_both(cfg: SimConfig, specs: list[RequestSpec]) -> tuple[object, object]:
    from pdserve.config.model import resolve_shape

    shape = resolve_shape(cfg.model)
    out = []
    for runs in (False, True):
        sim = Simulator(build_instances(cfg, shape), shape, get_link(cfg.link), cfg.layerwise, runs=runs)
        out.append(sim.run(specs))
    return out[0], out[1]


def _same(a: list[float], b: list[float]) -> bool:
    return all(x == y or (x != x and y != y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "cfg",
    [
        # tight decode KV: reservations refused, requests rejected at the router (503)
        SimConfig.of(model="llama-3.1-8b", mode="disagg", num_prefill=1, num_decode=3,
                     serving=merge(GPU_SCALE, {"cache": {"num_blocks": 600}})),
        # tight colocated KV: preemption and recompute mid-trace
        SimConfig.of(model="llama-3.1-8b", mode="colocated", num_colocated=2, serving=merge(
            GPU_SCALE, {"cache": {"num_blocks": 1500}, "colocated": {"max_num_batched_tokens": 512}})),
        SimConfig.of(model="llama-3-70b", mode="disagg", num_prefill=2, num_decode=2, tp_prefill=4, tp_decode=4,
                     serving=GPU_SCALE),
    ],
    ids=["disagg-tight", "colocated-preempt", "disagg-70b"],
)
def test_runs_equal_step_by_step(cfg: SimConfig) -> None:
    """Planning runs of decode steps changes how many events the sim takes, not one result."""
    specs = generate("chatbot", 300, rate=20.0, seed=3)
    a, b = _run_both(cfg, specs)
    assert b.num_events < a.num_events
    assert _same(a.first_token, b.first_token) and _same(a.finish, b.finish)
    assert sorted(a.itls) == sorted(b.itls)
    assert _same(a.max_itl, b.max_itl)  # each request's worst gap, through runs or step by step
    assert a.instances == b.instances and a.ports == b.ports
    assert a.num_preemptions == b.num_preemptions
    if cfg.mode == "colocated":
        assert a.num_preemptions > 0
    if cfg.cluster.cache.num_blocks:
        assert max(s["kv_peak_usage"] for s in a.instances.values()) > 0.9


def test_runs_equal_step_by_step_profiled_and_generic_models(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same with a measured profile (its own run-times method) and a model without one."""
    from pdserve.sim.profile import write_profile

    prof = tmp_path / "p.json"
    write_profile(prof, [[n, 0.01 + 1e-5 * n] for n in (16, 128, 512, 1024)],
                  [[b, c, 0.02 + 1e-3 * b + 1e-7 * b * c] for b in (1, 4, 16) for c in (64, 512)])
    specs = generate("chatbot", 120, rate=2.0, seed=5, max_prompt_tokens=900, max_output_tokens=200)
    cfg = SimConfig.of(model="demo", mode="disagg", num_prefill=1, num_decode=2, profile=str(prof), serving=GPU_SCALE)
    a, b = _run_both(cfg, specs)
    assert _same(a.finish, b.finish) and sorted(a.itls) == sorted(b.itls)
    policy = ColocatedScheduler(SchedulerConfig(max_num_batched_tokens=256), BlockManager(400, 16, False))
    specs = [RequestSpec(0.05 * i, 40 + 7 * i, 30 + i) for i in range(12)]
    r1 = _colocated(copy.deepcopy(policy)).run(specs)
    sim = Simulator([SimInstance("c0", "colocated", policy, FixedModel(), Port("c0", 1e9))], CATALOG["demo"],
                    get_link("cx7-400g"), runs=False)
    r0 = sim.run(specs)
    assert _same(r0.finish, r1.finish) and sorted(r0.itls) == sorted(r1.itls)
    assert r1.num_events < r0.num_events


def test_request_overhead_shifts_each_request_in() -> None:
    policy = ColocatedScheduler(SchedulerConfig(max_num_batched_tokens=1000), BlockManager(100, 16, False))
    inst = SimInstance("c0", "colocated", policy, FixedModel(), Port("c0", 1e9))
    r = Simulator([inst], CATALOG["demo"], get_link("cx7-400g"), request_overhead_s=0.025).run(
        [RequestSpec(0.0, 100, 5)])
    # as test_one_request_colocated_hand_checked, 25 ms later; the arrival still counts from the client
    assert r.arrival[0] == 0.0
    assert r.first_token[0] == pytest.approx(0.125)
    assert r.finish[0] == pytest.approx(0.165)


def test_profile_serving_overheads_per_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from pdserve.sim.build import request_overhead_s
    from pdserve.sim.profile import write_profile

    prof = tmp_path / "p.json"
    write_profile(prof, [[n, 0.01 + 1e-5 * n] for n in (16, 128, 512)],
                  [[b, c, 0.02 + 1e-3 * b] for b in (1, 4) for c in (64, 512)])
    p = json.loads(prof.read_text())
    p["serving"] = {"colocated": {"step_overhead_s": 0.003, "request_overhead_s": 0.007},
                    "disagg": {"step_overhead_s": 0.001, "request_overhead_s": 0.02}}
    prof.write_text(json.dumps(p))
    bare, colo = ProfiledModel.load(prof), ProfiledModel.load(prof, "colocated")
    assert colo.decode_time([100]) == pytest.approx(bare.decode_time([100]) + 0.003)
    assert colo.prefill_time([100]) == pytest.approx(bare.prefill_time([100]) + 0.003)
    assert colo.decode_run_times([100, 200], 3) == [colo.decode_time([100 + j, 200 + j]) for j in range(3)]
    cfg = SimConfig.of(model="demo", mode="disagg", profile=str(prof), serving=GPU_SCALE)
    assert request_overhead_s(cfg) == 0.02
    assert build_instances(cfg)[1].model.step_overhead_s == 0.001  # type: ignore[attr-defined]
    off = SimConfig.of(model="demo", mode="disagg", profile=str(prof), serving_overheads=False, serving=GPU_SCALE)
    assert request_overhead_s(off) == 0.0 and build_instances(off)[1].model.step_overhead_s == 0.0  # type: ignore[attr-defined]


def test_one_policy_object_runs_in_the_engine_and_in_the_simulator(tiny_models) -> None:  # type: ignore[no-untyped-def]
    """The acceptance check: the engine's own scheduler object, stepped by the real engine, then by
    the simulator; and the simulator builds instances of the very classes the engine uses."""
    from pdserve.engine.llm import LLM, SamplingParams

    llm = LLM(str(tiny_models["llama"]), dtype="float32", block_size=4, num_blocks=64,
              max_num_batched_tokens=32, enable_prefix_caching=False)
    policy = llm.scheduler
    calls = {"schedule": 0}
    schedule = policy.schedule

    def counted(now: float):  # type: ignore[no-untyped-def]
        calls["schedule"] += 1
        return schedule(now)

    policy.schedule = counted  # type: ignore[method-assign]
    outs = llm.generate([[1, 2, 3, 4, 5] * 8, [7, 8, 9] * 5], SamplingParams(max_tokens=6, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]
    engine_calls = calls["schedule"]
    assert engine_calls >= 3 and policy.block_manager.num_free_blocks == 64

    inst = SimInstance("c0", "colocated", policy, FixedModel(), Port("c0", 1e9))
    r = Simulator([inst], CATALOG["demo"], get_link("cx7-400g")).run([RequestSpec(0.0, 40, 6), RequestSpec(0.0, 15, 6)])
    assert calls["schedule"] > engine_calls and all(math.isfinite(t) for t in r.finish)
    assert policy.block_manager.num_free_blocks == 64

    sim_colocated = build_instances(SimConfig.of(model="demo", mode="colocated"))[0].policy
    assert type(sim_colocated) is type(policy) is ColocatedScheduler
