"""Workers switching roles at runtime, in a real cluster under load (`pdserve up`, 2 prefill + 1
decode, one cluster for the module): prefill -> decode, decode -> colocated and back, each while
streaming requests (the official openai client) are in flight. Every request completes with the
greedy text of a run with no switch, every KV block comes back, and /health shows the new roles.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import openai
import pytest

from tests import probes
from tests.servers import Server, running_server
from tests.test_cluster import URL_RE

pytestmark = pytest.mark.slow
SECRET = "role-switch"
KEY = "role-switch-key"
N = 8
MAX_TOKENS = 24
# The colocated worker's steps are not slowed: long outputs keep it busy until its switch begins
# (160 tokens ran out first in about one run in three once small decode batches got the native
# linear kernel); the prompts that go disaggregated run on the slowed decode role, 160 is plenty there.
LONG = (480,) * 6 + (160,) * 2  # per prompt of the third phase's `c` (6 x 505 tokens fit the 256 blocks)


def _prompts(seed: int, lengths: tuple[int, ...] = tuple(8 + 9 * k for k in range(N))) -> list[list[int]]:
    return [[(seed * 31 + k * 17 + j * 7) % 240 + 5 for j in range(n)] for k, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def cluster(tiny_models) -> Iterator[tuple[Server, str]]:  # type: ignore[no-untyped-def]
    model = str(tiny_models["llama"])
    # Prefill steps slowed by 400 ms, decode steps by 30 ms: requests stay on a worker long enough
    # for a switch to land while they are in flight; fast heartbeats so pools follow quickly.
    # Prompts under 32 tokens run whole (on a colocated worker if there is one, else on decode).
    args = ["up", "--model", model, "--threads", "1", "--port", "0", "--prefill", "2", "--decode", "1",
            "--colocated", "0", "--num-blocks", "256", "--disagg-threshold", "32", "--api-key", KEY, "--stats-interval-s", "0.2",
            "--fault-decode-step-delay-ms", "30", "--fault-prefill-delay-ms", "400"]
    with running_server(args, env={"PDSERVE_CLUSTER_SECRET": SECRET}, port_flag=None, url_pattern=URL_RE,
                        timeout=240) as srv:
        yield srv, model


def _health(url: str) -> dict:  # type: ignore[type-arg]
    return httpx.get(url + "/health", timeout=10).json()


def _roles(url: str) -> dict[str, tuple[str, str]]:
    """Worker name -> (role, state), as /health reports them."""
    return {w["name"]: (w["role"], w["state"]) for w in _health(url)["workers"]}


def _name(url: str, port: int) -> str:
    (name,) = [n for n in _roles(url) if n.endswith(f":{port}")]
    return name


async def _stream_all(url: str, model: str, prompts: list[list[int]],
                      max_tokens: int | tuple[int, ...] = MAX_TOKENS) -> list[str]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(p: list[int], n: int) -> str:
        text = ""
        s = await client.completions.create(model=model, prompt=p, max_tokens=n, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
        async for chunk in s:
            text += chunk.choices[0].text if chunk.choices else ""
        return text

    try:
        counts = (max_tokens,) * len(prompts) if isinstance(max_tokens, int) else max_tokens
        return list(await asyncio.gather(*(one(p, n) for p, n in zip(prompts, counts, strict=True))))
    finally:
        await client.close()


def _switch_cli(url: str, name: str, role: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", "role", "--router", url, *extra, name, role],
                          capture_output=True, text=True, timeout=300)


async def _switch(url: str, name: str, role: str, grace_s: float | None) -> None:
    body = {"role": role} if grace_s is None else {"role": role, "grace_s": grace_s}
    async with httpx.AsyncClient(timeout=300) as client:
        r = await client.post(f"{url}/admin/workers/{quote(name, safe='')}/role", json=body,
                              headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    assert r.json() == {"worker": name, "role": role, "up": True}


def _holds_work(port: int) -> bool:
    s = probes.stats(port, SECRET.encode())
    return s.running + s.waiting + s.reserved + s.queued_prompt_tokens > 0


async def _under_load(url: str, model: str, prompts: list[list[int]],
                      switches: list[tuple[str, int, str, float | None]],
                      max_tokens: int | tuple[int, ...] = MAX_TOKENS) -> list[str]:
    """Stream `prompts`; run each switch (worker name, its port, role, grace) in order, each as soon
    as the worker holds requests (its own Stats say so), so it switches with work in flight."""
    load = asyncio.create_task(_stream_all(url, model, prompts, max_tokens))
    for name, port, role, grace in switches:
        while not await asyncio.to_thread(_holds_work, port):
            assert not load.done(), "the requests ended before the worker held any"
            await asyncio.sleep(0.005)
        await _switch(url, name, role, grace)
    return await load


def _switch_log(srv: Server, worker: str) -> list[tuple[int, int]]:
    """Per switch of `worker` (role-index) so far: (requests in flight when it began, handed back)."""
    out: list[tuple[int, int]] = []
    for line in srv.output().splitlines():
        if line.startswith(f"[{worker}]") and (m := re.search(r"switching to \w+: (\d+) requests in flight", line)):
            out.append((int(m.group(1)), 0))
        elif line.startswith(f"[{worker}]") and (m := re.search(r"handing back (\d+) requests", line)):
            out[-1] = (out[-1][0], int(m.group(1)))
    return out


def _all_blocks_free(srv: Server) -> None:
    for w in probes.workers_of(srv.output()).values():
        probes.wait_for(lambda w=w: (s := probes.stats(w.port, SECRET.encode())).free_blocks == s.total_blocks
                        and s.running == s.waiting == s.reserved == 0, 15, f"{w.name}'s KV blocks back")


def test_switches_under_load_lose_nothing_and_pools_follow(cluster) -> None:  # type: ignore[no-untyped-def]
    srv, model = cluster
    ports = {k: w.port for k, w in probes.workers_of(srv.output()).items()}
    p0, p1, d0 = (_name(srv.url, ports[k]) for k in ("prefill-0", "prefill-1", "decode-0"))
    a, b = _prompts(1), _prompts(2)
    c = _prompts(3, (5, 9, 13, 17, 21, 25, 40, 60))  # most run whole: on the colocated worker while there is one
    ref = [asyncio.run(_stream_all(srv.url, model, a)), asyncio.run(_stream_all(srv.url, model, b)),
           asyncio.run(_stream_all(srv.url, model, c, LONG))]  # no switch
    assert all(all(t) for t in ref)

    # prefill -> decode, requests finishing on it first (default grace)
    out = asyncio.run(_under_load(srv.url, model, a, [(p0, ports["prefill-0"], "decode", None)]))
    assert out == ref[0]
    roles = _roles(srv.url)
    assert roles[p0] == ("decode", "up") and roles[p1] == ("prefill", "up") and roles[d0] == ("decode", "up")
    # its name is its id (unchanged); /health and the metrics labels give the role it serves now
    assert next(w for w in _health(srv.url)["workers"] if w["name"] == p0)["joined_as"] == "prefill"
    assert [lab["role"] for lab, _ in probes.metrics(srv.url)["pdserve:worker_up"] if lab["worker"] == p0] == ["decode"]
    assert probes.stats(ports["prefill-0"], SECRET.encode()).role == "decode"
    (held, back), = _switch_log(srv, "prefill-0")
    assert held > 0 and back == 0  # it had work when the switch began, and finished it
    _all_blocks_free(srv)

    # decode -> colocated, handing back at once what it holds (grace 0): retried elsewhere, losslessly
    out = asyncio.run(_under_load(srv.url, model, b, [(d0, ports["decode-0"], "colocated", 0.0)]))
    assert out == ref[1]
    assert _roles(srv.url)[d0] == ("colocated", "up")
    health = _health(srv.url)
    assert health["status"] == "ok" and health["roles"]["colocated"] == {"available": 1, "total": 1}
    (held, back), = _switch_log(srv, "decode-0")
    assert held > 0 and back > 0
    _all_blocks_free(srv)

    # and back: colocated -> decode (grace 0), decode -> prefill, one after the other under one load
    out = asyncio.run(_under_load(srv.url, model, c, [(d0, ports["decode-0"], "decode", 0.0),
                                                      (p0, ports["prefill-0"], "prefill", None)], LONG))
    assert out == ref[2]
    assert _roles(srv.url) == {p0: ("prefill", "up"), p1: ("prefill", "up"), d0: ("decode", "up")}
    assert _switch_log(srv, "decode-0")[1][0] > 0 and _switch_log(srv, "prefill-0")[1][0] > 0
    _all_blocks_free(srv)
    # the same outputs again with the cluster back as it started
    assert asyncio.run(_stream_all(srv.url, model, a)) == ref[0]
    _all_blocks_free(srv)


def test_the_admin_endpoint_is_authenticated_and_says_what_is_wrong(cluster) -> None:  # type: ignore[no-untyped-def]
    srv, _ = cluster
    name = next(iter(_roles(srv.url)))
    url = f"{srv.url}/admin/workers/{quote(name, safe='')}/role"
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(url, json={"role": "decode"}, timeout=30).status_code == 401
    assert httpx.post(url, json={"role": "gpu"}, headers=auth, timeout=30).status_code == 400
    assert httpx.post(url, json={}, headers=auth, timeout=30).status_code == 400
    r = httpx.post(f"{srv.url}/admin/workers/nobody%40x%3A1/role", json={"role": "decode"}, headers=auth, timeout=30)
    assert r.status_code == 404 and "no worker named" in r.json()["error"]["message"]
    role = _roles(srv.url)[name][0]
    r = httpx.post(url, json={"role": role}, headers=auth, timeout=30)  # already that role: a no-op
    assert r.status_code == 200 and r.json() == {"worker": name, "role": role, "up": True}
    bad = _switch_cli(srv.url, name, "decode")  # no API key
    assert bad.returncode == 1 and "401" in bad.stderr
    other = "decode" if role != "decode" else "prefill"
    for to in (other, role):  # the CLI, there and back
        r = _switch_cli(srv.url, name, to, "--api-key", KEY)
        assert r.returncode == 0 and r.stdout.strip() == f"{name} now serves as {to}", r.stderr
        assert _roles(srv.url)[name] == (to, "up")
