"""The README's "Failure semantics", row by row, on one real 2P2D cluster (`pdserve up`, demo model).

Faults are real: SIGSTOP makes a worker silent (its sockets stay open, so only the router's
timeouts can notice), SIGKILL and SIGTERM are what they are. What each test asserts is observed
from outside: HTTP responses and streams, the router's /metrics, each worker's own Stats over the
authenticated RPC, and /proc. Tests run in file order and put the cluster back as they found it.

The demo model (~20 ms per decode step here) makes long generations last far longer than any
bound a test waits for, so a broken abort or release cannot heal itself within the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests import probes
from tests.procs import alive, cmdline, wait_gone
from tests.servers import Server, running_server, start_server, wait_output

pytestmark = pytest.mark.slow

SECRET = "failure-semantics-secret"
FIRST_TOKEN_TIMEOUT_S = 3.0
TOKEN_TIMEOUT_S = 3.0
REF_TOKENS = 200
MODEL = "demo"
PROMPTS = [[(37 * i + 11 * j) % 4000 + 3 for j in range(8)] for i in range(8)]


@dataclass
class Cluster:
    up: Server
    workers: dict[str, probes.WorkerInfo]
    secret: bytes = SECRET.encode()
    restarted: list[Server] = field(default_factory=list)  # workers a test started again itself

    @property
    def url(self) -> str:
        return self.up.url

    def role(self, role: str) -> list[probes.WorkerInfo]:
        return [w for name, w in sorted(self.workers.items()) if w.role == role]

    def stats(self, w: probes.WorkerInfo):  # type: ignore[no-untyped-def]
        return probes.stats(w.port, self.secret)

    def free_blocks(self) -> dict[str, int]:
        return {n: self.stats(w).free_blocks for n, w in self.workers.items()}

    def up_gauge(self, w: probes.WorkerInfo) -> float | None:
        return probes.worker_gauge(self.url, "up").get(w.router_name)

    def wait_all_up(self, timeout: float = 20.0) -> None:
        probes.wait_for(lambda: all(self.up_gauge(w) == 1.0 for w in self.workers.values()), timeout,
                        "every worker in the router's pool")

    def restart(self, w: probes.WorkerInfo, argv: list[str]) -> None:
        """Start `w` again with the command line it had, at the same address."""
        assert argv[1:3] == ["-m", "pdserve.cli"], argv
        srv = start_server(argv[3:], {"PDSERVE_CLUSTER_SECRET": SECRET}, port_flag=None)
        self.restarted.append(srv)
        m = wait_output(srv, rf"READY {w.role} [0-9.]+:{w.port} pid=(\d+)")
        self.workers[w.name] = probes.WorkerInfo(w.name, w.role, w.port, int(m.group(1)))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cfg = tmp_path_factory.mktemp("failure-semantics") / "cluster.yaml"
    cfg.write_text(f"router: {{first_token_timeout_s: {FIRST_TOKEN_TIMEOUT_S}, token_timeout_s: {TOKEN_TIMEOUT_S}}}\n")
    args = ["up", "--config", str(cfg), "--model", MODEL, "--threads", "1", "--port", "0",
            "--prefill", "2", "--decode", "2"]
    with running_server(args, env={"PDSERVE_CLUSTER_SECRET": SECRET}, port_flag=None,
                        url_pattern=r"serving \S+ at (http://[0-9.:]+)/v1", timeout=240) as up:
        c = Cluster(up, probes.workers_of(up.output()))
        assert sorted(c.workers) == ["decode-0", "decode-1", "prefill-0", "prefill-1"], up.tail()
        try:
            c.wait_all_up()
            yield c
        finally:
            for srv in c.restarted:
                srv.stop(5)


def _body(prompt: list[int], max_tokens: int, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            **extra}


def _complete(url: str, prompt: list[int], max_tokens: int = 40, **extra: object) -> dict:  # type: ignore[type-arg]
    r = httpx.post(url + "/v1/completions", json=_body(prompt, max_tokens, return_token_ids=True, **extra),
                   timeout=120, trust_env=False)
    assert r.status_code == 200, r.text
    return r.json()




class Stream:
    """One SSE completion stream read event by event: text so far, the final chunk, errors."""

    def __init__(self, url: str, body: dict[str, object]) -> None:
        self._client = httpx.Client(timeout=120, trust_env=False)
        self._cm = self._client.stream("POST", url + "/v1/completions", json={**body, "stream": True})
        self.response = self._cm.__enter__()
        assert self.response.status_code == 200, self.response.read()
        self._lines = self.response.iter_lines()
        self.text = ""
        self.events = 0
        self.last: dict = {}  # type: ignore[type-arg]
        self.errors: list[dict] = []  # type: ignore[type-arg]
        self.done = False
        self.max_gap = 0.0  # the longest wait for one line, in seconds

    def read(self, n_events: int | None = None) -> Stream:
        """Read `n_events` more data events (all of them when None)."""
        target = None if n_events is None else self.events + n_events
        t = time.monotonic()
        for line in self._lines:
            now = time.monotonic()
            self.max_gap, t = max(self.max_gap, now - t), now
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                self.done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                self.errors.append(chunk["error"])
                continue
            self.events += 1
            self.text += "".join(c.get("text", "") for c in chunk["choices"])
            self.last = chunk
            if target is not None and self.events >= target:
                break
        return self

    def close(self) -> None:
        """Hang up (mid-stream, if it is not done)."""
        self._cm.__exit__(None, None, None)
        self._client.close()


@pytest.fixture(scope="module")
def reference(cluster: Cluster) -> list[dict]:  # type: ignore[type-arg]
    """Every prompt's greedy output on the healthy cluster: the no-fault run faults are held to."""
    return probes.parallel([lambda p=p: _complete(cluster.url, p, REF_TOKENS) for p in PROMPTS])


def _tokens(resp: dict) -> list[int]:  # type: ignore[type-arg]
    return resp["choices"][0]["token_ids"]


def _decode_serving(c: Cluster) -> probes.WorkerInfo:
    """The one decode worker that has a request in flight right now (per the router)."""
    inflight = probes.worker_gauge(c.url, "inflight")
    busy = [w for w in c.role("decode") if inflight.get(w.router_name, 0) > 0]
    assert len(busy) == 1, inflight
    return busy[0]


def _retry_reasons(c: Cluster, w: probes.WorkerInfo) -> set[str]:
    """Why the router gave up on attempts at `w`, as its log says ("attempt N failed (WORKER silent
    for 3s)"), with the worker's name left out."""
    reasons = re.findall(r"attempt \d+ failed \(([^)]*)\)", c.up.output())
    return {r.replace(w.router_name, "").strip(" :") for r in reasons if w.router_name in r}


def _blocks_back(c: Cluster, start: dict[str, int], timeout: float, what: str) -> float:
    return probes.wait_for(lambda: c.free_blocks() == start, timeout, f"{what}: {c.free_blocks()} != {start}")


# ---- request fields and router metrics, on the healthy cluster -----------------------------------

def test_http_fields_through_the_router(cluster: Cluster, reference: list[dict]) -> None:  # type: ignore[type-arg]
    """stop_token_ids, min_tokens and max_completion_tokens go through HTTP, router and workers."""
    ref = _tokens(reference[0])
    k = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])  # its first occurrence is at k
    got = _complete(cluster.url, PROMPTS[0], 40, stop_token_ids=[ref[k]])
    assert got["choices"][0]["finish_reason"] == "stop"
    assert _tokens(got) == ref[:k + 1]
    # min_tokens: a stop token before it is not a stop.
    t0 = ref[0]
    want_stop = next((i for i in range(3, 40) if ref[i] == t0), None)
    got = _complete(cluster.url, PROMPTS[0], 40, stop_token_ids=[t0], min_tokens=3)
    assert _tokens(got) == ref[:(want_stop + 1) if want_stop is not None else 40]
    assert got["choices"][0]["finish_reason"] == ("stop" if want_stop is not None else "length")
    # max_completion_tokens (the chat name of max_tokens).
    r = httpx.post(cluster.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_completion_tokens": 7,
        "temperature": 0, "ignore_eos": True}, timeout=60, trust_env=False)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 7 and r.json()["choices"][0]["finish_reason"] == "length"


def test_router_timings_and_metrics(cluster: Cluster, reference: list[dict]) -> None:  # type: ignore[type-arg]
    """The disaggregated path's phases in `timings`, and the histograms `bench compare` reads."""
    for resp in reference:
        (t,) = resp["timings"]
        assert {"router_queue", "prefill_queue", "prefill", "transfer", "decode"} <= set(t), t
        assert all(v >= 0 for v in t.values()), t
        assert "retries" not in t
        assert t["decode"] > 0
    before = probes.metrics(cluster.url)
    s = Stream(cluster.url, _body(PROMPTS[1], 30)).read()
    s.close()
    assert s.done and not s.errors
    after = probes.metrics(cluster.url)

    def count(snapshot, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
        return sum(v for lab, v in snapshot.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))

    # 30 tokens streamed: 29 gaps between them.
    assert count(after, "pdserve:inter_token_latency_seconds_count") - count(
        before, "pdserve:inter_token_latency_seconds_count") == 29
    for phase in ("router_queue", "prefill_queue", "prefill", "transfer", "decode"):
        assert count(after, "pdserve:request_phase_seconds_count", phase=phase) >= len(PROMPTS) + 1, phase
    busy = probes.worker_gauge(cluster.url, "busy_fraction")
    assert set(busy) == {w.router_name for w in cluster.workers.values()}
    assert all(0 <= v < 1 for v in busy.values()), busy
    for role in ("prefill", "decode"):  # each pool has computed something
        assert sum(busy[w.router_name] for w in cluster.role(role)) > 0, busy


# ---- client disconnect ---------------------------------------------------------------------------

def test_client_disconnect_aborts_on_every_worker(cluster: Cluster) -> None:
    """Streams of 1,900-token generations dropped after a few tokens: every block comes back well
    before the generations could have finished, or the 30 s reservation expiry could free them."""
    c = cluster
    start = c.free_blocks()
    streams, per_token = [], []
    for p in PROMPTS[:4]:
        s = Stream(c.url, _body(p, 1900)).read(1)
        t0 = time.monotonic()
        streams.append(s.read(10))
        per_token.append((time.monotonic() - t0) / 10)
    running = sum(c.stats(w).running for w in c.role("decode"))
    assert running == 4, "the generations were not running on the decode workers"
    assert all(not s.done for s in streams)
    for s in streams:
        s.close()
    # Had the abort not reached the workers, blocks would come back only when the generations end.
    natural = (1900 - 11) * min(per_token)
    bound = min(20.0, natural / 3)  # and under the 30 s reservation expiry
    _blocks_back(c, start, bound, "blocks back after the clients hung up")
    assert sum(c.stats(w).running + c.stats(w).reserved for w in c.role("decode")) == 0


# ---- silent and dead workers ----------------------------------------------------------------------

def test_prefill_silent_before_first_token(cluster: Cluster, reference: list[dict]) -> None:  # type: ignore[type-arg]
    """A SIGSTOPped prefill worker: its requests go to the other one after first_token_timeout_s,
    the decode reservations they held are freed while it is still silent, and it rejoins on SIGCONT."""
    c = cluster
    start = c.free_blocks()
    p0 = c.workers["prefill-0"]  # ties go to the first-listed prefill worker: the first request lands here
    os.kill(p0.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        got = probes.parallel([lambda p=p: _complete(c.url, p, 40) for p in PROMPTS[:4]])
        elapsed = time.monotonic() - t0
        assert [_tokens(g) for g in got] == [_tokens(r)[:40] for r in reference[:4]]
        retried = [g for g in got if g["timings"][0].get("retries", 0) >= 1]
        assert retried, "no request was sent to the silent prefill worker"
        # Retried because first_token_timeout_s ran out (the router says why; a longer timeout, a
        # 30 s reservation expiry or a client timeout would read differently): not sooner, and not
        # only when something else gave up. Total times carry the retried generation too, so they
        # bound nothing on a loaded machine; the reason does.
        assert FIRST_TOKEN_TIMEOUT_S <= elapsed
        assert _retry_reasons(c, p0) == {f"silent for {FIRST_TOKEN_TIMEOUT_S:.0f}s"}, c.up.tail()
        assert elapsed < 30.0  # and before the reservation expiry could have been what retried it
        assert c.up_gauge(p0) == 0.0  # left the pool: missed its heartbeats
        decode_start = {w.name: start[w.name] for w in c.role("decode")}
        probes.wait_for(lambda: {w.name: c.stats(w).free_blocks for w in c.role("decode")} == decode_start, 15.0,
                        "decode reservations of the silent prefill's attempts freed while it is still stopped")
    finally:
        os.kill(p0.pid, signal.SIGCONT)
    probes.wait_for(lambda: c.up_gauge(p0) == 1.0, 10.0, "the stalled prefill worker rejoins")
    _blocks_back(c, start, 10.0, "every block back once the stalled worker resumed")


def _stall_mid_stream(c: Cluster, reference: list[dict], sig: signal.Signals, prompt_index: int,  # type: ignore[type-arg]
                      **sampling: object) -> tuple[probes.WorkerInfo, list[str]]:
    """Stream a long generation, hit its decode worker with `sig` mid-stream; the same stream must
    end with the no-fault text (`reference`'s, or with `sampling`, the same request's on the healthy
    cluster). Returns the worker and its command line."""
    want = (_complete(c.url, PROMPTS[prompt_index], REF_TOKENS, **sampling) if sampling
            else reference[prompt_index])
    s = Stream(c.url, _body(PROMPTS[prompt_index], REF_TOKENS, **sampling)).read(5)
    d = _decode_serving(c)
    argv = cmdline(d.pid)
    os.kill(d.pid, sig)
    try:
        t0 = time.monotonic()
        s.max_gap = 0.0
        s.read()
        stalled = time.monotonic() - t0
    finally:
        s.close()
    assert s.done and not s.errors, s.errors
    assert s.text == want["choices"][0]["text"]
    assert s.last["timings"].get("retries", 0) >= 1, s.last
    if sig == signal.SIGSTOP:
        # Failed over because token_timeout_s ran out (the router's reason), and the stream's one
        # long gap is that stall: the time of the whole rest of the stream is no bound on a loaded
        # machine (195 tokens), the longest silence between two events is.
        assert TOKEN_TIMEOUT_S <= stalled
        assert f"silent for {TOKEN_TIMEOUT_S:.0f}s" in _retry_reasons(c, d), c.up.tail()
        assert s.max_gap < 4 * TOKEN_TIMEOUT_S, s.max_gap
    return d, argv


def test_decode_stall_mid_stream_continues_the_same_stream(cluster: Cluster, reference: list[dict]) -> None:  # type: ignore[type-arg]
    c = cluster
    start = c.free_blocks()
    d = None
    try:
        d, _ = _stall_mid_stream(c, reference, signal.SIGSTOP, 4)
    finally:
        if d is not None:
            os.kill(d.pid, signal.SIGCONT)
        else:  # the stall itself failed: resume whichever was stopped
            for w in c.role("decode"):
                os.kill(w.pid, signal.SIGCONT)
    c.wait_all_up()
    _blocks_back(c, start, 10.0, "every block back once the stalled decode worker resumed")


def test_decode_death_mid_stream_and_the_restarted_worker_rejoins(cluster: Cluster, reference: list[dict]  # type: ignore[type-arg]
                                                                 ) -> None:
    c = cluster
    start = c.free_blocks()
    # Seeded sampling: the resumed attempt must draw what the first would have (seed, position).
    d, argv = _stall_mid_stream(c, reference, signal.SIGKILL, 5, temperature=1.0, top_p=0.95, seed=77)
    probes.wait_for(lambda: c.up_gauge(d) == 0.0, 5.0, "the dead decode worker leaves the pool")
    assert wait_gone([d.pid], 5.0) == []
    c.restart(d, argv)  # same command line, same address
    c.wait_all_up()  # rejoined by itself: nobody told the router
    got = probes.parallel([lambda p=p: _complete(c.url, p, 40) for p in PROMPTS[:4]])
    assert [_tokens(g) for g in got] == [_tokens(r)[:40] for r in reference[:4]]
    assert c.stats(c.workers[d.name]).busy_fraction > 0, "the restarted worker got no work"
    _blocks_back(c, {**start, d.name: c.stats(c.workers[d.name]).total_blocks}, 10.0, "blocks back")


def test_prefill_death_frees_the_decode_reservation(cluster: Cluster, reference: list[dict]) -> None:  # type: ignore[type-arg]
    """Requests whose prefill worker dies while their decode blocks are reserved: retried on the
    other prefill worker, and the reservations freed at once (not when they would expire, 30 s)."""
    c = cluster
    start = c.free_blocks()
    p0 = c.workers["prefill-0"]
    argv = cmdline(p0.pid)
    os.kill(p0.pid, signal.SIGSTOP)  # holds its requests before their first token...
    results: list = []  # type: ignore[type-arg]
    runner = threading.Thread(target=lambda: results.extend(
        probes.parallel([lambda p=p: _complete(c.url, p, 40) for p in PROMPTS[:4]])))
    runner.start()
    try:
        # Any reservation seen within first_token_timeout_s of the start is one the router still
        # holds for the stopped worker (it lets go only once that timeout runs out).
        probes.wait_for(lambda: sum(c.stats(w).reserved for w in c.role("decode")) >= 1, FIRST_TOKEN_TIMEOUT_S,
                        "a decode reservation waiting on the stopped prefill worker")
    finally:
        os.kill(p0.pid, signal.SIGKILL)  # ...then dies with them
    t_kill = time.monotonic()
    runner.join(timeout=120)
    assert [_tokens(g) for g in results] == [_tokens(r)[:40] for r in reference[:4]]
    decode_start = {w.name: start[w.name] for w in c.role("decode")}
    # Well before the 30 s expiry of a reservation made before the kill (the retried requests'
    # own generations may take a while on a loaded machine: they end well before that too).
    probes.wait_for(lambda: {w.name: c.stats(w).free_blocks for w in c.role("decode")} == decode_start,
                    max(1.0, 20.0 - (time.monotonic() - t_kill)), "decode blocks back soon after the kill")
    assert sum(c.stats(w).reserved for w in c.role("decode")) == 0
    assert wait_gone([p0.pid], 5.0) == []
    c.restart(p0, argv)
    c.wait_all_up()
    _blocks_back(c, {**start, p0.name: c.stats(c.workers[p0.name]).total_blocks}, 10.0, "blocks back")


# ---- SIGTERM drain --------------------------------------------------------------------------------

def test_sigterm_drains_a_decode_worker(cluster: Cluster, reference: list[dict]) -> None:  # type: ignore[type-arg]
    """SIGTERM with requests in flight: the worker reports draining, refuses new reservations,
    leaves the router's pool, finishes what it has (no failover), then exits."""
    c = cluster
    streams = [Stream(c.url, _body(p, REF_TOKENS)).read(3) for p in PROMPTS[:4]]
    d = c.workers["decode-0"]
    mine = c.stats(d).running
    assert mine >= 1, "no request in flight on the worker to drain"
    os.kill(d.pid, signal.SIGTERM)
    probes.wait_for(lambda: c.stats(d).draining, 5.0, "the worker reports draining")
    assert not probes.reserve(d.port, c.secret, "after-sigterm", [5, 6, 7]).ok
    probes.wait_for(lambda: c.up_gauge(d) == 0.0, 5.0, "the draining worker leaves the router's pool")
    assert c.stats(d).running >= 1  # still finishing its requests
    got = _complete(c.url, PROMPTS[6], 40)  # new work goes to the other decode worker
    assert _tokens(got) == _tokens(reference[6])[:40]
    for s in streams:
        s.read()
        s.close()
    assert all(s.done and not s.errors for s in streams)
    assert [s.text for s in streams] == [r["choices"][0]["text"] for r in reference[:4]]
    assert all("retries" not in s.last["timings"] for s in streams), "a drained request was failed over"
    assert wait_gone([d.pid], 30.0) == [], "the drained worker did not exit"


def test_ctrl_c_stops_up_and_its_workers(cluster: Cluster) -> None:
    """SIGINT to `pdserve up`: the router stops, its workers are stopped, `up` exits 0."""
    c = cluster
    pids = [w.pid for w in probes.workers_of(c.up.output()).values() if alive(w.pid)]
    assert pids
    os.kill(c.up.proc.pid, signal.SIGINT)
    assert c.up.proc.wait(timeout=60) == 0, c.up.tail()
    # Gone by the time `up` is: it stopped them and waited (they would also die on their own once
    # `up` is gone, which this does not count).
    assert [pid for pid in pids if alive(pid)] == []
