"""The transfer fallback chain, observed by the path each request took (its `timings`, and which
workers computed), with every KV push cut: another decode worker, then the colocated worker, then
(no colocated worker left) a decode worker running the prefill itself. Greedy output stays equal to
transformers throughout. Last, `up` is SIGKILLed and its workers die with it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import httpx
import pytest

from tests import probes
from tests.procs import wait_gone
from tests.servers import Server, running_server
from tests.test_engine_vs_hf import MAX_TOKENS, _hf_greedy

pytestmark = pytest.mark.slow
SECRET = "fallback-secret"
PROMPTS = [[(13 * i + 7 * j) % 300 + 3 for j in range(20 + 9 * i)] for i in range(4)]


@pytest.fixture(scope="module")
def model(tiny_models) -> str:  # type: ignore[no-untyped-def]
    return str(tiny_models["llama"])


@pytest.fixture(scope="module")
def want(model: str) -> list[list[int]]:
    return _hf_greedy(model, PROMPTS)


@pytest.fixture(scope="module")
def up(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cfg = tmp_path_factory.mktemp("fallback") / "cluster.yaml"
    cfg.write_text("transfer: {fault_cut_prob: 1.0}\n")  # every KV push is cut after its first chunk
    args = ["up", "--config", str(cfg), "--model", model, "--threads", "1", "--port", "0",
            "--prefill", "1", "--decode", "2", "--colocated", "1"]
    with running_server(args, env={"PDSERVE_CLUSTER_SECRET": SECRET}, port_flag=None,
                        url_pattern=r"serving \S+ at (http://[0-9.:]+)/v1", timeout=240) as srv:
        probes.wait_for(lambda: list(probes.worker_gauge(srv.url, "up").values()) == [1.0] * 4, 20, "workers up")
        yield srv


def _run(up: Server, model: str) -> list[dict]:  # type: ignore[type-arg]
    def one(i: int) -> httpx.Response:
        return httpx.post(up.url + "/v1/completions", timeout=120, trust_env=False, json={
            "model": model, "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True})

    out = probes.parallel([lambda i=i: one(i) for i in range(len(PROMPTS))])
    assert all(r.status_code == 200 for r in out), [r.text for r in out]
    return [r.json() for r in out]


def _busy(up: Server) -> dict[str, float]:
    return {n: probes.stats(w.port, SECRET.encode()).busy_fraction for n, w in probes.workers_of(up.output()).items()}


def _free(up: Server) -> dict[str, int]:
    return {n: probes.stats(w.port, SECRET.encode()).free_blocks for n, w in probes.workers_of(up.output()).items()}


def _served_whole_after(resp: dict, retries: int) -> None:  # type: ignore[type-arg]
    (t,) = resp["timings"]
    assert t.get("retries") == retries, t  # one failed push per decode worker tried
    assert "transfer" not in t and "queue" in t, t  # no KV moved: prefilled where it was decoded


def test_second_decode_worker_then_the_colocated_worker(up: Server, model: str, want: list[list[int]]) -> None:
    start = _free(up)
    got = _run(up, model)
    assert [g["choices"][0]["token_ids"] for g in got] == want
    for g in got:
        _served_whole_after(g, 2)
    busy = _busy(up)
    assert busy["colocated-0"] > 0 and busy["prefill-0"] > 0
    assert busy["decode-0"] == busy["decode-1"] == 0, busy  # no decode worker ran a step
    probes.wait_for(lambda: _free(up) == start, 10.0, "every block back after the failed pushes")


def test_no_colocated_worker_left_a_decode_worker_prefills(up: Server, model: str, want: list[list[int]]) -> None:
    c = probes.workers_of(up.output())["colocated-0"]
    os.kill(c.pid, signal.SIGKILL)
    probes.wait_for(lambda: probes.worker_gauge(up.url, "up")[c.router_name] == 0.0, 5.0, "colocated gone")
    got = _run(up, model)
    assert [g["choices"][0]["token_ids"] for g in got] == want
    for g in got:
        _served_whole_after(g, 2)
    workers = probes.workers_of(up.output())
    assert sum(probes.stats(workers[n].port, SECRET.encode()).busy_fraction for n in ("decode-0", "decode-1")) > 0


def test_workers_die_when_up_is_killed(up: Server) -> None:
    workers = probes.workers_of(up.output())
    pids = [w.pid for n, w in workers.items() if n != "colocated-0"]
    os.kill(up.proc.pid, signal.SIGKILL)
    up.proc.wait(timeout=10)
    assert wait_gone(pids, 30.0) == [], "workers outlived a SIGKILLed `pdserve up`"
