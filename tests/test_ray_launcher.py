"""`pdserve up --launcher ray` on a multi-node Ray cluster faked on this machine
(`ray.cluster_utils.Cluster`: a head and two nodes, each with its own custom resource).

One Ray cluster serves the module; two pdserve clusters run on it in turn:
- A, `pdserve up` as a user runs it: prefill on node_a, two decode workers on node_b. Greedy
  output through the official `openai` client equals transformers, streamed and not; prefill and
  decode run on different nodes and the KV went over tcp; SIGKILL of a decode worker's process
  mid-stream: every stream ends with the no-fault tokens, and the worker comes back (a new
  process, a new address) and serves again; SIGTERM on `up` stops its workers and nothing else.
- B, driven in this process through the launcher interface (what the elastic-serving work calls):
  prefill on node_a, decode spread over node_a and node_b. The same-node pair moves KV over shm,
  the cross-node pair over tcp; a decode worker added and removed at runtime joins and leaves the
  router; node_b removed: the cluster keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import probes
from tests.procs import alive
from tests.servers import Server, running_server
from tests.test_cluster import _check_against_hf, _prompts
from tests.test_failure_semantics import Stream

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow

SECRET = "ray-launcher-secret"
STORE = 80 * 1024 * 1024
UP_LINE = r"pdserve: {name} (?:up|restarted) on node (\w+) at ([0-9.]+):(\d+) pid=(\d+)"


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict]:  # type: ignore[type-arg]
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": STORE, "resources": {"head": 1}})
    nodes = {name: c.add_node(num_cpus=2, object_store_memory=STORE, resources={name: 1, "pool": 1})
             for name in ("node_a", "node_b")}
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield {"cluster": c, "nodes": nodes}
    finally:
        ray.shutdown()
        c.shutdown()


@ray.remote(num_cpus=0, resources={"head": 0.01})
class Bystander:
    """Someone else's actor on the same Ray cluster: `pdserve up` must leave it alone."""

    def ping(self) -> int:
        return os.getpid()


def _worker(out: str, name: str) -> tuple[str, int, int]:
    """(node id, port, pid) of a worker as `up` last reported it."""
    found = re.findall(UP_LINE.format(name=re.escape(name)), out)
    assert found, f"no line for {name}"
    node, _, port, pid = found[-1]
    return node, int(port), int(pid)


def _port(h) -> int:  # type: ignore[no-untyped-def]
    return int(h.address.rsplit(":", 1)[1])


def _stats(port: int):  # type: ignore[no-untyped-def]
    return probes.stats(port, SECRET.encode())


@pytest.fixture(scope="module")
def up_a(cluster: dict, tiny_models: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # type: ignore[type-arg]
    cfg = tmp_path_factory.mktemp("ray-a") / "cluster.yaml"
    cfg.write_text("prefill: {workers: 1, ray_resources: {node_a: 0.01}}\n"
                   "decode: {workers: 2, ray_resources: {node_b: 0.01}}\n"
                   "transfer: {transport: auto}\n"
                   "router: {token_timeout_s: 3, first_token_timeout_s: 5}\n")
    args = ["up", "--launcher", "ray", "--ray-address", cluster["cluster"].address, "--config", str(cfg),
            "--model", str(tiny_models["llama"]), "--threads", "1", "--port", "0"]
    with running_server(args, env={"PDSERVE_CLUSTER_SECRET": SECRET}, port_flag=None,
                        url_pattern=r"serving \S+ at (http://[0-9.:]+)/v1", timeout=240) as srv:
        probes.wait_for(lambda: list(probes.worker_gauge(srv.url, "up").values()) == [1.0] * 3, 30, "workers up")
        yield srv


def test_prefill_and_decode_on_two_nodes_match_transformers_over_tcp(up_a: Server, tiny_models: dict) -> None:  # type: ignore[type-arg]
    from transformers import AutoTokenizer

    folder = tiny_models["llama"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    _check_against_hf(up_a.url, folder, _prompts(8, len(tok), seed=5), tok)
    out = up_a.output()
    p_node, p_port, _ = _worker(out, "prefill-0")
    nodes = {_worker(out, f"decode-{i}")[0] for i in range(2)}
    assert len(nodes) == 1 and p_node not in nodes  # the placement the resources asked for
    p = _stats(p_port)
    assert p.node_id.startswith(p_node) and p.kv_sent_tcp >= 16 and p.kv_sent_shm == 0
    assert SECRET not in out  # nor in any log line the workers wrote (Ray forwards them to `up`)
    for name in ("prefill-0", "decode-0"):
        pid = _worker(out, name)[2]
        for what in ("cmdline", "environ"):
            assert SECRET.encode() not in Path(f"/proc/{pid}/{what}").read_bytes(), (name, what)


def test_sigkill_of_a_decode_process_mid_stream(up_a: Server, tiny_models: dict) -> None:  # type: ignore[type-arg]
    """Every stream ends with the tokens of the no-fault run; the killed worker's actor is
    restarted by Ray, its new process rejoins the router and takes work again."""
    prompts = [[5 + i, 17, 33 + i, 8] for i in range(4)]
    body = {"model": str(tiny_models["llama"]), "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    want = [httpx.post(up_a.url + "/v1/completions", json={**body, "prompt": p}, timeout=60,
                       trust_env=False).json()["choices"][0]["text"] for p in prompts]
    streams = [Stream(up_a.url, {**body, "prompt": p}).read(3) for p in prompts]
    out = up_a.output()
    decodes = {f"decode-{i}": _worker(out, f"decode-{i}") for i in range(2)}
    name, (_, port, pid) = max(decodes.items(), key=lambda kv: _stats(kv[1][1]).running)
    os.kill(pid, signal.SIGKILL)
    try:
        for s in streams:
            s.read()
    finally:
        for s in streams:
            s.close()
    assert all(s.done and not s.errors for s in streams), [s.errors for s in streams]
    assert [s.text for s in streams] == want
    assert any(s.last["timings"].get("retries", 0) >= 1 for s in streams)
    probes.wait_for(lambda: _worker(up_a.output(), name)[2] != pid, 90, f"{name} restarted")
    _, new_port, new_pid = _worker(up_a.output(), name)
    assert alive(new_pid) and not alive(pid)
    router_name = f"decode@127.0.0.1:{new_port}"
    probes.wait_for(lambda: probes.worker_gauge(up_a.url, "up").get(router_name) == 1.0, 30, "rejoined")
    assert f"decode@127.0.0.1:{port}" not in probes.worker_gauge(up_a.url, "up")

    def served() -> bool:
        httpx.post(up_a.url + "/v1/completions", json={**body, "prompt": prompts[0], "max_tokens": 4},
                   timeout=60, trust_env=False).raise_for_status()
        return _stats(new_port).kv_received > 0

    probes.wait_for(served, 30, "the restarted worker serves")


def test_sigterm_stops_what_up_started_and_nothing_else(up_a: Server, cluster: dict) -> None:  # type: ignore[type-arg]
    other = Bystander.remote()
    other_pid = ray.get(other.ping.remote(), timeout=60)
    out = up_a.output()
    pids = [_worker(out, n)[2] for n in ("prefill-0", "decode-0", "decode-1")]
    up_a.proc.send_signal(signal.SIGTERM)
    assert up_a.proc.wait(60) == 0
    probes.wait_for(lambda: not any(alive(p) for p in pids), 20, "every worker process gone")
    assert ray.get(other.ping.remote(), timeout=30) == other_pid  # the user's actor, untouched
    assert sum(n["Alive"] for n in ray.nodes()) == 3  # and the user's Ray cluster still runs
    ray.kill(other)


def test_same_node_pair_uses_shm_add_remove_and_node_loss(cluster: dict, tiny_models: dict) -> None:  # type: ignore[type-arg]
    from pdserve.config.load import cluster_from_dict
    from pdserve.launch.ray_launcher import RayLauncher
    from pdserve.launch.serving import run_cluster

    folder = str(tiny_models["llama"])
    cfg = cluster_from_dict({
        "model": folder, "threads": 1,
        "prefill": {"workers": 1, "ray_resources": {"node_a": 0.01}},
        "decode": {"workers": 2, "ray_resources": {"pool": 0.01}, "ray_strategy": "spread"},
        "transfer": {"transport": "auto"}, "router": {"port": 0, "token_timeout_s": 3},
        "launch": {"launcher": "ray"}})
    launcher = RayLauncher(cfg)
    got: dict[str, object] = {}
    ready = threading.Event()

    def serving(server: object, url: str) -> None:
        got.update(server=server, url=url)
        ready.set()

    os.environ["PDSERVE_CLUSTER_SECRET"] = SECRET
    try:
        t = threading.Thread(target=run_cluster, args=(cfg, launcher, serving), daemon=True)
        t.start()
        assert ready.wait(240), "the cluster did not come up"
    finally:
        del os.environ["PDSERVE_CLUSTER_SECRET"]
    url = str(got["url"])
    try:
        by_name = {h.name: h for h in launcher.workers()}
        prefill, decodes = by_name["prefill-0"], [by_name["decode-0"], by_name["decode-1"]]
        same = next(d for d in decodes if d.node_id == prefill.node_id)
        other = next(d for d in decodes if d.node_id != prefill.node_id)
        probes.wait_for(lambda: list(probes.worker_gauge(url, "up").values()) == [1.0] * 3, 30, "workers up")

        def complete(n: int, seed: int) -> None:
            prompts = _prompts(n, 300, seed)
            asyncio.run(_complete_all_ok(url, folder, prompts))

        def received() -> tuple[int, int]:
            return _stats(_port(same)).kv_received, _stats(_port(other)).kv_received

        for seed in range(10):  # until the routing policy has used both pairs
            complete(8, seed)
            if min(received()) > 0:
                break
        p = _stats(_port(prefill))
        assert min(received()) > 0 and (p.kv_sent_shm, p.kv_sent_tcp) == received()  # shm iff same node

        added = launcher.add_worker("decode")
        probes.wait_for(lambda: probes.worker_gauge(url, "up").get(f"decode@{added.address}") == 1.0, 10,
                        "the added worker joins the router")
        removed = launcher.remove_worker("decode")
        assert removed == added and not alive(added.pid)
        probes.wait_for(lambda: f"decode@{added.address}" not in probes.worker_gauge(url, "up"), 10,
                        "the removed worker leaves the router")

        cluster["cluster"].remove_node(cluster["nodes"]["node_b"])
        probes.wait_for(lambda: probes.worker_gauge(url, "up").get(f"decode@{other.address}") == 0.0, 30,
                        "node_b's decode worker gone")
        complete(6, 99)  # every request served, on node_a alone
    finally:
        got["server"].should_exit = True  # type: ignore[attr-defined]
        t.join(60)
    assert not t.is_alive() and not any(alive(h.pid) for h in (prefill, same))


async def _complete_all_ok(url: str, model: str, prompts: list[list[int]]) -> None:
    from tests.test_cluster import _complete_all

    for stream in (False, True):  # an error raises (openai.APIStatusError)
        out = await _complete_all(url, model, prompts, stream=stream)
        assert all(out), out
