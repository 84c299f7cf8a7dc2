"""A served step's prefill share, alone and while another worker of the host computes: the model
(pdserve/sim/profile.py), the simulated instances that charge it (pdserve/sim/instance.py,
build.share_host) and its measurement from recorded runs (pdserve/bench/prefill_factors.py)."""

from __future__ import annotations

import json

import pytest

from pdserve.bench.prefill_factors import decode_samples, prefill_factors_from, step_samples
from pdserve.config.engine import SchedulerConfig
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.colocated import ColocatedScheduler
from pdserve.sched.request import Request
from pdserve.sim.build import SimConfig, build, share_host
from pdserve.sim.events import EventLoop
from pdserve.sim.instance import SimInstance
from pdserve.sim.network import Port
from pdserve.sim.profile import ProfiledModel, write_profile

PREFILL = [[n, 0.01 + 4e-4 * n] for n in (16, 128, 256, 512)]
DECODE = [[b, c, 0.015 + 2e-3 * b + 1e-6 * b * c] for b in (1, 4, 16) for c in (64, 512)]
SERVING = {"colocated": {"prefill_factor": 1.2, "corun_prefill_factor": 1.5}}


@pytest.fixture()
def profile(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "p.json"
    write_profile(path, PREFILL, DECODE, attention="grouped")
    p = json.loads(path.read_text())
    p["serving"] = SERVING
    path.write_text(json.dumps(p))
    return path


def test_the_factor_scales_the_step_beyond_its_decodes_own_inside_the_step(profile) -> None:  # type: ignore[no-untyped-def]
    bare, served = ProfiledModel.load(profile), ProfiledModel.load(profile, "colocated")
    chunks, decodes = [(200, 0)], [230, 250]
    own = bare.decode_time(decodes)
    rest = bare.mixed_time(chunks, decodes) - own
    assert served.mixed_time(chunks, decodes) == pytest.approx(own + 1.2 * rest)
    assert served.mixed_time(chunks, decodes, corun=True) == pytest.approx(own + 1.5 * rest)
    assert served.prefill_time([200]) == pytest.approx(1.2 * bare.prefill_time([200]))
    assert served.prefill_share(chunks, decodes) == pytest.approx((own, rest))
    # Decode steps are the profile's: the factors are about prefill work.
    assert served.decode_time(decodes) == bare.decode_time(decodes)
    assert served.decode_run_times(decodes, 3) == bare.decode_run_times(decodes, 3)
    assert served.shares_host and not bare.shares_host


def _instance(name: str, model: ProfiledModel, loop: EventLoop) -> SimInstance:
    sched = ColocatedScheduler(SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=8),
                               BlockManager(256, 16, enable_prefix_caching=False))
    inst = SimInstance(name, "colocated", sched, model, Port(name, 1e9))
    inst.attach(loop, lambda *a: None)
    return inst


def test_a_prefill_step_that_starts_while_a_peer_computes_is_charged_the_corun_factor(profile) -> None:  # type: ignore[no-untyped-def]
    model = ProfiledModel.load(profile, "colocated")
    loop = EventLoop()
    a, b = _instance("a", model, loop), _instance("b", model, loop)
    share_host([a, b])
    assert a.peers == [b] and b.peers == [a]
    # b alone: its prompt's step is timed as if the host had nothing else to do.
    b.policy.add_request(Request("1", [0] * 200, 4, 0.0), 0.0)
    b.kick(0.0)
    assert b.busy_time == pytest.approx(model.prefill_time([200]))
    # a starts a prompt while b computes: the co-running factor.
    a.policy.add_request(Request("2", [0] * 200, 4, 0.0), 0.0)
    a.kick(0.0)
    assert a.busy_time == pytest.approx(model.prefill_time([200], corun=True))
    assert a.busy_time > b.busy_time


def test_build_makes_peers_only_of_a_profile_measured_with_its_host(profile, tmp_path) -> None:  # type: ignore[no-untyped-def]
    shared = build(SimConfig.of(model="demo", mode="colocated", num_colocated=2, profile=str(profile)))
    assert [len(i.peers) for i in shared.instances] == [1, 1]
    bare = tmp_path / "bare.json"
    write_profile(bare, PREFILL, DECODE, attention="grouped")
    alone = build(SimConfig.of(model="demo", mode="colocated", num_colocated=2, profile=str(bare)))
    assert [i.peers for i in alone.instances] == [[], []]


def _record(index: int, arrival: float, prompt: int, ttft: float, itl: list[float], prefill: float | None) -> dict:
    return {"index": index, "arrival_s": arrival, "lag_s": 0.0, "prompt_tokens": prompt, "output_tokens": len(itl) + 1,
            "success": True, "ttft_s": ttft, "itl_s": itl, "timings": {} if prefill is None else {"prefill": prefill}}


def test_the_factors_are_read_off_the_engines_step_timing_and_the_token_times(profile) -> None:  # type: ignore[no-untyped-def]
    bare = ProfiledModel.load(profile)
    # Request 0 decodes on worker A (steps end at 1.00, 1.02, then 1.30 after request 1's prompt,
    # whose step the engine timed at 0.28 s: scheduled at 1.02, first token at 1.30).
    r0 = _record(0, 0.0, 100, 0.98, [0.02, 0.02, 0.28, 0.02], 0.1)
    r1 = _record(1, 1.0, 200, 0.30, [0.02], 0.28)
    own, rest = bare.prefill_share([(200, 0)], [100 + 3])
    want = (0.28 - own) / rest
    got = {(round(f, 9), c) for f, c in step_samples([r0, r1], bare, 512, colocated=True)}
    assert (round(want, 9), False) in got
    # Request 2 streams on worker B meanwhile (tokens at 1.05, 1.12, 1.19, 1.26): co-running.
    r2 = _record(2, 0.9, 50, 0.15, [0.07, 0.07, 0.07, 0.07], None)
    got = {(round(f, 9), c) for f, c in step_samples([r0, r1, r2], bare, 512, colocated=True)}
    assert (round(want, 9), True) in got
    # A prompt step whose tokens overflow the token budget is left out (it may have been chunked).
    assert all(abs(f - want) > 1e-9 for f, _ in step_samples([r0, r1], bare, 150, colocated=True))
    cmp_ = {"modes": {"colocated": {"runs": [{"requests": [r0, r1, r2]}] * 5}}}
    found = prefill_factors_from(cmp_, str(profile), {"colocated": 512})["colocated"]
    assert found["corun_prefill_factor"] == pytest.approx(want)
    assert found["samples_corun"] == 5


@pytest.mark.parametrize("mode", ["colocated", "disagg"])
def test_runs_of_decode_steps_change_nothing_with_peers(profile, mode: str) -> None:  # type: ignore[no-untyped-def]
    """A peer inside a planned run of decode steps is busy exactly when it is step by step."""
    from pdserve.config.model import resolve_shape
    from pdserve.sim.cluster import Simulator
    from pdserve.sim.hardware import get_link
    from pdserve.workload import generate

    p = json.loads(profile.read_text())
    p["serving"]["colocated"] = {**SERVING["colocated"], "corun_decode_factor": 1.3}  # decode steps co-run too
    p["serving"]["disagg"] = p["serving"]["colocated"]
    profile.write_text(json.dumps(p))
    cfg = SimConfig.of(model="demo", mode=mode, num_prefill=1, num_decode=1, num_colocated=2, profile=str(profile))
    specs = generate("chatbot", 80, rate=6.0, seed=4, max_prompt_tokens=400, max_output_tokens=60)
    shape = resolve_shape("demo")
    out = []
    for runs in (False, True):
        sim = build(cfg)
        sim = Simulator(sim.instances, shape, get_link(cfg.link), cfg.layerwise, runs=runs)
        assert all(i.peers for i in sim.instances)
        out.append(sim.run(specs))
    a, b = out
    assert a.finish == b.finish and sorted(a.itls) == sorted(b.itls) and a.instances == b.instances
    # ...and the co-running factor did bite: the same cluster without peers finishes otherwise.
    alone = build(cfg)
    for i in alone.instances:
        i.peers = []
    assert alone.run(specs).finish != a.finish


def test_a_decode_step_that_starts_while_a_peer_prefills_is_charged_the_decode_factor(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Decode-only steps slow while another worker of the host prefills; a planned run of them is
    cut at the peer's prompt and goes on step by step at the co-running time until it ends."""
    path = tmp_path / "d.json"
    write_profile(path, PREFILL, DECODE, attention="grouped",
                  serving={"colocated": {"step_overhead_s": 0.001, "corun_decode_factor": 1.4}})
    model = ProfiledModel.load(path, "colocated")
    assert model.shares_host
    ctx = [300, 310]
    assert model.decode_time(ctx, corun=True) - 0.001 == pytest.approx(1.4 * (model.decode_time(ctx) - 0.001))
    loop = EventLoop()
    ends: list[float] = []
    a, b = _instance("a", model, loop), _instance("b", model, loop)
    a.attach(loop, lambda i, out, fin, now: ends.append(now), lambda i, reqs, e: ends.extend(e))
    a.runs = True  # _instance's attach (no run hook) had turned runs off
    share_host([a, b])
    a.policy.add_request(Request("1", [0] * 16, 60, 0.0), 0.0)
    a.kick(0.0)
    loop.run(until=0.3)
    assert a._run is not None  # decoding in a planned run
    b.policy.add_request(Request("2", [0] * 500, 2, 0.3), 0.3)
    b.kick(0.3)
    assert b.prefilling
    prompt_end = 0.3 + model.prefill_time([500])
    loop.run()
    gaps = {round(e1, 9): e1 - e0 for e0, e1 in zip(ends, ends[1:], strict=False)}
    one = model.decode_time([40])  # about any of a's steps (contexts 17-76 change it by < 1%)
    during = [g for e, g in gaps.items() if 0.3 + 0.5 * one < e - g < prompt_end]  # started inside b's prompt
    after = [g for e, g in gaps.items() if e - g > prompt_end + one]
    assert during and after
    assert all(g == pytest.approx(1.4 * (one - 0.001) + 0.001, rel=0.02) for g in during)
    assert all(g == pytest.approx(one, rel=0.02) for g in after)


def test_the_decode_factor_is_read_off_decode_steps_under_another_workers_prompt(profile) -> None:  # type: ignore[no-untyped-def]
    bare = ProfiledModel.load(profile)
    # Request 0 decodes alone in 20 ms steps, then in 30 ms ones while request 1's prompt step
    # (0.3 s, on the other worker) runs from 1.1 to 1.4, then in 20 ms ones again.
    r0 = _record(0, 0.0, 100, 1.0, [0.02] * 5 + [0.03] * 10 + [0.02] * 5, 0.1)
    r1 = _record(1, 1.1, 200, 0.30, [], 0.30)
    got = decode_samples([r0, r1], bare)
    corun = [f for f, c in got if c]
    alone = [f for f, c in got if not c]
    assert len(corun) == len(alone) == 9  # the step ending with request 1's first token is left out
    assert all(f * bare.decode_time([110]) == pytest.approx(0.03, rel=0.02) for f in corun)
    cmp_ = {"modes": {"disaggregated": {"runs": [{"requests": [r0, r1]}]}}}
    found = prefill_factors_from(cmp_, str(profile), {"disaggregated": 512})["disaggregated"]
    assert found["corun_decode_factor"] == pytest.approx(1.5, rel=0.02)
