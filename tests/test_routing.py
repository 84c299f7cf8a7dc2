"""The router's routing policy, pure: pair selection, retry order, local fallback, reject."""

from __future__ import annotations

import pytest

from pdserve.sched.routing import Route, RoutingPolicy, WorkerLoad


def _p(name: str, queued: int, available: bool = True) -> WorkerLoad:
    return WorkerLoad(name, pending_tokens=queued, available=available)


def _d(name: str, free: int, running: int = 0, available: bool = True) -> WorkerLoad:
    return WorkerLoad(name, free_blocks=free, total_blocks=100, running=running, available=available)


def test_pick_prefill_least_queued_ties_take_turns_skips_unavailable_and_excluded() -> None:
    pol = RoutingPolicy()
    ws = [_p("a", 50), _p("b", 10), _p("c", 10), _p("d", 0, available=False)]
    assert {pol.pick_prefill(ws).name for _ in range(4)} == {"b", "c"}  # type: ignore[union-attr]
    assert pol.pick_prefill(ws, frozenset({"b"})).name == "c"  # type: ignore[union-attr]
    assert pol.pick_prefill(ws, frozenset({"a", "b", "c"})) is None


def test_rank_decode_most_free_then_fewest_running() -> None:
    pol = RoutingPolicy()
    ws = [_d("a", 10, 1), _d("b", 30, 5), _d("c", 30, 2), _d("d", 99, available=False)]
    assert [w.name for w in pol.rank_decode(ws)] == ["c", "b", "a"]
    assert [w.name for w in pol.rank_decode(ws, frozenset({"c"}))] == ["b", "a"]
    # the router's own generating count weighs as much as a stale report's
    ws = [_d("a", 30, 0), _d("b", 30, 1)]
    ws[0].decoding = 3
    assert [w.name for w in pol.rank_decode(ws)] == ["b", "a"]


def test_pick_colocated_least_work_not_fewest_requests() -> None:
    pol = RoutingPolicy(decode_token_weight=16)
    # a: one long prompt still to compute; b: three short generating sequences (3 x 16 tokens)
    ws = [WorkerLoad("a", pending_tokens=600), WorkerLoad("b", decoding=3), WorkerLoad("c", available=False)]
    assert pol.pick_colocated(ws, prompt_tokens=100).name == "b"  # type: ignore[union-attr]
    assert pol.pick_colocated(ws, frozenset({"a", "b"})) is None


def test_disagg_route_tries_decode_in_rank_order() -> None:
    pol = RoutingPolicy()
    r = pol.route(100, [_p("p0", 0)], [_d("d0", 5), _d("d1", 50)], [])
    assert r == Route("disagg", decode=("d1", "d0"))
    # a decode worker lost on this request, or one a transfer failed to, is not tried
    assert pol.route(100, [_p("p0", 0)], [_d("d0", 5), _d("d1", 50)], [], bad_kv=frozenset({"d1"})).decode == ("d0",)


def test_short_prompts_and_failed_transfers_go_local() -> None:
    pol = RoutingPolicy(disagg_threshold=30)
    pre, dec, colo = [_p("p0", 0)], [_d("d0", 50)], [WorkerLoad("c0", decoding=2), WorkerLoad("c1")]
    assert pol.route(29, pre, dec, colo) == Route("local", worker="c1")
    assert pol.route(30, pre, dec, colo).path == "disagg"
    assert pol.route(30, pre, dec, colo, bad_kv=frozenset({"x", "y"})) == Route("local", worker="c1")


def test_local_falls_back_to_decode_without_a_colocated_pool() -> None:
    dec = [_d("d0", 50), _d("d1", 50)]
    dec[0].decoding, dec[1].decoding = 4, 1
    assert RoutingPolicy().route(10, [_p("p0", 0, available=False)], dec, []) == Route("local", worker="d1")
    # a decode instance that cannot serve whole requests (the simulator's): reject instead
    r = RoutingPolicy(decode_serves_whole=False).route(10, [_p("p0", 0, available=False)], dec, [])
    assert r.path == "reject" and r.status == 503


def test_nothing_available_rejects() -> None:
    r = RoutingPolicy().route(10, [], [_d("d0", 50, available=False)], [])
    assert r == Route.reject("no worker is available")


def test_prefill_for_prefers_a_healthy_link_and_rejects_when_none() -> None:
    pol = RoutingPolicy()
    pre = [_p("p0", 0), _p("p1", 100)]
    assert pol.prefill_for("d0", pre) == "p0"
    assert pol.prefill_for("d0", pre, bad_links=frozenset({"p0"})) == "p1"
    assert pol.prefill_for("d0", pre, bad_links=frozenset({"p0", "p1"})) == "p0"  # any link beats none
    r = pol.prefill_for("d0", pre, avoid=frozenset({"p0", "p1"}))
    assert isinstance(r, Route) and r.path == "reject"


def test_every_decode_refusing_is_a_reject_not_a_queue() -> None:
    r = RoutingPolicy().refused()
    assert r.path == "reject" and r.status == 503


def test_retry_backoff_doubles_caps_and_jitters() -> None:
    from pdserve.sched.routing import retry_backoff_s

    mid = [retry_backoff_s(a, 0.05, 2.0, 0.5) for a in range(1, 9)]  # jitter factor 1.0
    assert mid == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0])
    for a in (1, 4, 8):  # the jitter spans [0.5, 1.5) of the nominal wait
        nominal = min(2.0, 0.05 * 2 ** (a - 1))
        assert retry_backoff_s(a, 0.05, 2.0, 0.0) == pytest.approx(0.5 * nominal)
        assert retry_backoff_s(a, 0.05, 2.0, 0.999) == pytest.approx(1.499 * nominal)
