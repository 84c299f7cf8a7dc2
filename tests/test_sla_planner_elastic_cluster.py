"""The elastic planner in a real cluster (`pdserve up --planner sla --planner-elastic`, one colocated
worker, at most two): streaming traffic that needs more than one worker makes the planner start a
second worker PROCESS through the launcher; it joins the router's pool and serves requests with the
same greedy texts as the first worker gave alone; once the traffic stops, the planner removes the
surplus worker after its cool-down: the process exits, the router forgets it, every request
completed, and the survivor's KV blocks are all free.

The planner's performance model is the committed step-time profile of `demo` on this kind of CPU
(as in test_sla_planner_cluster.py): at these lengths one instance plans for under 1 req/s, and
eight concurrent streams finish several per second on any machine, so the scale-up does not depend
on how loaded the test machine is; an idle interval plans for one.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest

from tests import probes
from tests.procs import alive
from tests.servers import Server, running_server
from tests.test_cluster import URL_RE
from tests.test_role_switch_cluster import KEY, SECRET, _prompts, _stream_all

pytestmark = pytest.mark.slow
PROFILE = Path(__file__).resolve().parents[1] / "bench/results/profile_demo_cpu.json"
MAX_TOKENS = 16
MAX_ROUNDS = 150  # rounds of the same eight prompts sent at most while waiting for the new worker
AFTER = 2  # rounds sent once the new worker has served


def _actions(url: str, action: str) -> dict[str, float]:
    """pdserve:planner_actions_total per outcome, for one action (add / remove / switch)."""
    fam = probes.metrics(url).get("pdserve:planner_actions_total", [])
    return {labels["outcome"]: v for labels, v in fam if labels.get("action") == action}


def _served_tokens(url: str, router_name: str) -> float:
    """Tokens the worker's engine computed, as its heartbeat reports them to the router."""
    return sum(v for labels, v in probes.metrics(url).get("pdserve:engine_step_tokens_total", [])
               if labels.get("worker") == router_name)


def _health_workers(url: str) -> dict[str, tuple[str, str]]:
    return {w["name"]: (w["role"], w["state"])
            for w in httpx.get(url + "/health", timeout=10).json()["workers"]}


def _decisions(srv: Server) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(m) for m in re.findall(r"planner decision (\{.*\})", srv.output())]


async def _load(srv: Server, model: str, prompts: list[list[int]]) -> tuple[list[str], list[list[str]]]:
    """Rounds of the same prompts, all streamed at once, until the worker the planner adds has served
    some of them, then `AFTER` more: (the first round's texts, every later round's)."""
    first = await _stream_all(srv.url, model, prompts, MAX_TOKENS)
    # the reference: one worker alone served it (a second needs seconds to start, and one interval
    # of traffic to be asked for)
    assert "colocated-1" not in probes.workers_of(srv.output()), srv.tail()
    rounds: list[list[str]] = []
    after = None
    while len(rounds) < MAX_ROUNDS and (after is None or len(rounds) < after):
        rounds.append(await _stream_all(srv.url, model, prompts, MAX_TOKENS))
        new = probes.workers_of(srv.output()).get("colocated-1")
        if after is None and new is not None and await asyncio.to_thread(_served_tokens, srv.url, new.router_name):
            after = len(rounds) + AFTER
    assert after is not None, f"no added worker served within {MAX_ROUNDS} rounds:\n{srv.tail()}"
    return first, rounds


def test_planner_adds_a_worker_under_load_and_removes_it_when_idle(tiny_models) -> None:  # type: ignore[no-untyped-def]
    model = str(tiny_models["llama"])
    # colocated only, 1 s intervals, a 4 s cool-down (longer than any lull between rounds of traffic)
    args = ["up", "--model", model, "--threads", "1", "--port", "0", "--prefill", "0", "--decode", "0",
            "--colocated", "1", "--num-blocks", "160", "--api-key", KEY, "--stats-interval-s", "0.2",
            "--planner", "sla", "--planner-modes", "colocated", "--planner-elastic", "--planner-max-workers", "2",
            "--planner-max-colocated", "2", "--planner-predictor", "constant", "--slo-ttft-ms", "2000",
            "--slo-tpot-ms", "100", "--planner-interval-s", "1", "--planner-cooldown-s", "4",
            "--planner-profile", str(PROFILE)]
    prompts = _prompts(4, tuple(60 + 9 * k for k in range(8)))
    with running_server(args, env={"PDSERVE_CLUSTER_SECRET": SECRET}, port_flag=None, url_pattern=URL_RE,
                        timeout=240) as srv:
        first, rounds = asyncio.run(_load(srv, model, prompts))
        assert all(first) and all(r == first for r in rounds), (first, rounds)
        assert _actions(srv.url, "add") == {"ok": 1.0}, srv.tail()
        old, new = (probes.workers_of(srv.output())[k] for k in ("colocated-0", "colocated-1"))

        # traffic stopped: after the cool-down one idle interval asks for one worker; the newest goes
        probes.wait_for(lambda: _actions(srv.url, "remove").get("ok", 0) >= 1, 60, "the surplus worker removed")
        assert re.search(rf"planner: remove {re.escape(new.router_name)}\b", srv.output()), srv.tail()
        assert not alive(new.pid) and alive(old.pid)
        probes.wait_for(lambda: list(_health_workers(srv.url)) == [old.router_name], 10, "the router forgets it")
        assert _health_workers(srv.url) == {old.router_name: ("colocated", "up")}
        assert [lab["worker"] for lab, _ in probes.metrics(srv.url)["pdserve:worker_up"]] == [old.router_name]
        s = probes.stats(old.port, SECRET.encode())
        assert s.free_blocks == s.total_blocks and s.running == s.waiting == s.reserved == 0

        # within the limits throughout: never a third worker, never more than two wanted
        assert sorted(probes.workers_of(srv.output())) == ["colocated-0", "colocated-1"]
        decisions = _decisions(srv)
        assert decisions and max(d["wanted"]["colocated"] for d in decisions) == 2
        assert all(sum(d["wanted"].values()) <= 2 and sum(d["current"].values()) <= 2 for d in decisions)
        assert _actions(srv.url, "add") == {"ok": 1.0} and _actions(srv.url, "remove") == {"ok": 1.0}
        assert all(v == 0 for _, v in probes.metrics(srv.url).get("pdserve:request_errors_total", []))
