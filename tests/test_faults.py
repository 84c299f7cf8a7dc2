"""Real faults: workers killed with SIGKILL mid-run; every request completes, greedy output unchanged."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal

import httpx
import pytest

from tests import probes
from tests.test_cluster import _up, _wait_for, _worker_gauge

pytestmark = pytest.mark.slow


def _pids(output: str) -> dict[str, int]:
    """role-index -> pid, from the workers' READY lines in `pdserve up`'s output."""
    return {f"{m.group(1)}-{m.group(2)}": int(m.group(3))
            for m in re.finditer(r"\[(\w+)-(\d+)\] READY \w+ \S+ pid=(\d+)", output)}


async def _stream_all(url: str, model: str, prompts: list[list[int]], max_tokens: int,
                      on_progress=None, sampling: list[dict] | None = None,
                      retried: list[int] | None = None) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Token ids of every prompt (greedy, or with `sampling[i]`'s fields added to request i);
    the indices of requests the router retried go to `retried`."""
    sem = asyncio.Semaphore(200)
    done = 0

    # At most 100 requests in flight (the pool's connections; the rest wait in the client): after the
    # chaos test's kill they fit the surviving decode worker's 128 sequence slots. More would wait
    # for room up to reserve_wait_s (5 s) and, on a loaded machine, get a 503: overload, not failover.
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=100)) as client:
        async def one(i: int, p: list[int]) -> list[int]:
            nonlocal done
            async with sem:
                body = {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True, "return_token_ids": True, **(sampling[i] if sampling else {})}
                r = await client.post(url + "/v1/completions", json=body)
                assert r.status_code == 200, r.text
                if retried is not None and r.json()["timings"][0].get("retries"):
                    retried.append(i)
                done += 1
                if on_progress:
                    on_progress(done)
                return r.json()["choices"][0]["token_ids"]

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def test_chaos_kill_prefill_and_decode_mid_run(tiny_models):
    """2P2D, 200 requests (100 at a time); SIGKILL one prefill and one decode worker mid-run. A third of
    the requests sample (seeded, temperature/top-p/top-k): resumed ones must go on drawing exactly
    what they would have drawn, so their tokens equal the no-fault run's too."""
    folder = tiny_models["llama"]
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.choice([4, 20, 60]))] for _ in range(200)]
    sampling = [{"max_tokens": 48, **({"temperature": 1.0, "top_p": 0.95, "top_k": 50, "seed": 1000 + i}
                                     if i % 3 == 0 else {})} for i in range(len(prompts))]
    with _up(str(folder), "--prefill", "1", "--decode", "1", "--colocated", "0") as ref:
        want = asyncio.run(_stream_all(ref.url, str(folder), prompts, 24, sampling=sampling))
    with _up(str(folder), "--prefill", "2", "--decode", "2") as srv:
        pids = _pids(srv.output())
        assert {"prefill-0", "prefill-1", "decode-0", "decode-1"} <= set(pids)
        victim = probes.workers_of(srv.output())["decode-1"].router_name

        async def run() -> list[list[int]]:
            """The kills come once the router holds 8 requests on decode-1 (its own count, not a
            heartbeat's): reserved there or decoding, some mid-stream, so failover resumes them
            after some tokens (the case seeded sampling must survive). Timed by the client's own
            progress instead (a canary's tokens, a count of answers), a loaded machine had often
            finished every request first, and nothing was retried."""
            all_done = asyncio.ensure_future(_stream_all(srv.url, str(folder), prompts, 24, None, sampling, retried))
            while not all_done.done():
                inflight = await asyncio.to_thread(_worker_gauge, srv.url, "inflight")
                if inflight.get(victim, 0) >= 8:
                    os.kill(pids["prefill-0"], signal.SIGKILL)
                    os.kill(pids["decode-1"], signal.SIGKILL)
                    killed.append(victim)
                    break
                await asyncio.sleep(0.02)
            return await all_done

        retried: list[int] = []
        killed: list[str] = []
        got = asyncio.run(run())
        assert killed, "the router never held 8 requests on decode-1"
        assert got == want
        # Some requests were resumed mid-run (which ones depends on timing; a seeded resume mid-stream
        # is forced in test_failure_semantics.py::test_decode_death_mid_stream...).
        assert retried
        assert len({tuple(want[i]) for i in range(0, len(prompts), 3)}) > 50  # sampled: all differ
        _wait_for(lambda: sum(_worker_gauge(srv.url, "up").values()) == 2, timeout=30)
        up = _worker_gauge(srv.url, "up")
        assert len(up) == 4  # the killed workers are still listed, as down
        assert sorted(up.values()) == [0.0, 0.0, 1.0, 1.0]


def _config(tmp_path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return str(path)


def test_new_worker_joins_a_running_router(tiny_models):
    """A decode worker the router was not started with joins through POST /admin/workers while the
    router runs, and takes over the load, with the same greedy tokens the original decode worker gave.
    (It starts beside the cluster, to save a worker's start-up; it joins only after the first run.)"""
    from tests.servers import launch_worker, worker_ready

    folder = tiny_models["llama"]
    prompts = [[7, 8, 9 + i] for i in range(6)]
    env = {"PDSERVE_CLUSTER_SECRET": "join-me"}
    new = launch_worker("decode", str(folder), env=env)  # starts beside the cluster; joins it later
    try:
        with running_server_env({**os.environ, **env}, str(folder)) as srv:
            want = asyncio.run(_stream_all(srv.url, str(folder), prompts, 6))
            worker_ready(new)
            r = httpx.post(srv.url + "/admin/workers", json={"role": "decode", "address": new.url}, timeout=30)
            assert r.status_code == 200 and r.json()["up"] is True, r.text
            bad = httpx.post(srv.url + "/admin/workers", json={"role": "boss", "address": "x"}, timeout=30)
            assert bad.status_code == 400
            os.kill(_pids(srv.output())["decode-0"], signal.SIGKILL)
            _wait_for(lambda: _worker_gauge(srv.url, "up").get(f"decode@{new.url}") == 1.0
                      and _worker_gauge(srv.url, "up").get(f"decode@{_decode0(srv.output())}") == 0.0)
            got = asyncio.run(_stream_all(srv.url, str(folder), prompts, 6))
            assert got == want  # served by the new worker: the only decode worker left
    finally:
        new.stop(5)


def _decode0(output: str) -> str:
    m = re.search(r"\[decode-0\] READY decode ([0-9.]+:\d+)", output)
    assert m, output[-2000:]
    return m.group(1)


def running_server_env(env: dict[str, str], model: str):  # type: ignore[no-untyped-def]
    from tests.servers import running_server

    args = ["up", "--model", model, "--threads", "1", "--port", "0", "--prefill", "1", "--decode", "1"]
    return running_server(args, env=env, port_flag=None, url_pattern=r"serving \S+ at (http://[0-9.:]+)/v1",
                          timeout=240)
