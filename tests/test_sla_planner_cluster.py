"""The online planner in a real cluster (`pdserve up --planner sla`, 1 prefill + 1 decode): long
prompts with short outputs make it turn disaggregation off (both workers colocated), through role
switches it makes itself while streaming requests are in flight. Every request completes with the
greedy text the settled cluster gives, every KV block comes back, /health and /metrics show the
planner's split.

The planner's performance model is the committed step-time profile of `demo` on this kind of CPU
(bench/results/profile_demo_cpu.json): the tiny model serves, the profile says what a step costs,
so the decision depends on the traffic and the model, not on how loaded the test machine is.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from tests import probes
from tests.servers import running_server
from tests.test_cluster import URL_RE
from tests.test_role_switch_cluster import KEY, SECRET, _all_blocks_free, _prompts, _roles, _stream_all

pytestmark = pytest.mark.slow
PROFILE = Path(__file__).resolve().parents[1] / "bench/results/profile_demo_cpu.json"
MAX_TOKENS = 16
GAP_S = 0.25  # between requests: with 60 ms decode steps, about four in flight
MAX_REQUESTS = 200  # sent at most while waiting for the planner to switch
AFTER = 6  # requests sent once it has switched


def _switches(url: str) -> dict[str, float]:
    """pdserve:planner_actions_total per outcome, for switches."""
    fam = probes.metrics(url).get("pdserve:planner_actions_total", [])
    return {labels["outcome"]: v for labels, v in fam if labels.get("action") == "switch"}


async def _load_until_switched(url: str, model: str, prompts: list[list[int]]) -> list[str]:
    """Stream one request every `GAP_S` (several in flight at any time) until the planner has
    switched both workers, then `AFTER` more; every request's text, in order."""
    tasks: list[asyncio.Task[list[str]]] = []
    after = None
    for p in prompts:
        tasks.append(asyncio.create_task(_stream_all(url, model, [p], MAX_TOKENS)))
        await asyncio.sleep(GAP_S)
        if after is None and _switches(url).get("ok", 0) >= 2:
            after = len(tasks) + AFTER
        if after is not None and len(tasks) >= after:
            break
    return [t for texts in await asyncio.gather(*tasks) for t in texts]


def test_planner_turns_disaggregation_off_under_long_prompts_losing_nothing(tiny_models) -> None:  # type: ignore[no-untyped-def]
    model = str(tiny_models["llama"])
    # Decode steps slowed by 60 ms so requests are in flight on both workers when the planner acts;
    # a long cool-down so the test sees exactly one decision to act on.
    args = ["up", "--model", model, "--threads", "1", "--port", "0", "--prefill", "1", "--decode", "1",
            "--colocated", "0", "--num-blocks", "160", "--api-key", KEY, "--stats-interval-s", "0.2",
            "--fault-decode-step-delay-ms", "60",
            "--planner", "sla", "--slo-ttft-ms", "4000", "--slo-tpot-ms", "250", "--planner-interval-s", "2",
            "--planner-cooldown-s", "600", "--planner-profile", str(PROFILE)]
    prompts = [p for w in range(MAX_REQUESTS // 8) for p in _prompts(w, tuple(200 + 16 * k for k in range(8)))]
    with running_server(args, env={"PDSERVE_CLUSTER_SECRET": SECRET}, port_flag=None, url_pattern=URL_RE,
                        timeout=240) as srv:
        out = asyncio.run(_load_until_switched(srv.url, model, prompts))
        assert _switches(srv.url) == {"ok": 2.0}, srv.tail()
        roles = _roles(srv.url)
        assert sorted(roles.values()) == [("colocated", "up")] * 2, roles
        health = httpx.get(srv.url + "/health", timeout=10).json()
        assert health["roles"] == {"colocated": {"available": 2, "total": 2}}
        wanted = {lab["role"]: v for lab, v in probes.metrics(srv.url)["pdserve:planner_workers"]
                  if lab["kind"] == "wanted"}
        assert wanted == {"prefill": 0, "decode": 0, "colocated": 2}
        _all_blocks_free(srv)
        # the same prompts on the settled cluster (no switch now): the same greedy texts
        sent = prompts[: len(out)]
        ref = [t for k in range(0, len(sent), 8) for t in asyncio.run(_stream_all(srv.url, model, sent[k:k + 8],
                                                                                  MAX_TOKENS))]
        assert all(ref) and len(ref) == len(out) < len(prompts)
        assert out == ref
        _all_blocks_free(srv)
        assert _switches(srv.url) == {"ok": 2.0}  # and the planner holds the split it chose
        # the switches landed with work in flight on at least one worker
        held = [int(n) for n in re.findall(r"switching to colocated: (\d+) requests in flight", srv.output())]
        assert len(held) == 2 and max(held) > 0, held
