"""Admission, model ids and /health over HTTP, with real processes.

A standalone colocated server and a router over prefill, decode and colocated workers, each with a
KV cache of a few blocks: a request none of them could finish is a 400 naming why (never a hang:
every client call has a timeout), unknown models are 404s, and the router's /health says whether
the cluster can serve, following workers killed and restarted. A SIGTERMed standalone server
reports draining on /health while it finishes what it has.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.servers import HOST, Server, free_port, running_server, start_server

pytestmark = pytest.mark.slow
TIMEOUT = 60.0  # every client call: a request queued for good fails the test instead of hanging it
KV = 64  # tokens of KV on each worker below (4 blocks of 16)


def _wait_for(cond, timeout: float = 30.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    return err


# ---- a standalone colocated server ----------------------------------------------------------

@pytest.fixture(scope="module")
def colocated(tiny_models):  # type: ignore[no-untyped-def]
    folder = str(tiny_models["llama"])
    with running_server(["serve", "--role", "colocated", "--model", folder, "--threads", "1",
                         "--num-blocks", "4", "--block-size", "16"]) as srv:
        yield srv, folder


@pytest.mark.parametrize("stream", [False, True])
def test_colocated_refuses_what_its_kv_cannot_hold(colocated, stream):
    srv, model = colocated
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT, trust_env=False) as c:
        body = {"model": model, "prompt": [5] * 60, "max_tokens": 6, "stream": stream, "ignore_eos": True}
        err = _error(c.post("/v1/completions", json=body), 400)
        assert err["type"] == "invalid_request_error"
        assert "KV cache" in err["message"] and "65 tokens" in err["message"], err
        # At the edge it runs (and the refused one did not block the queue).
        r = c.post("/v1/completions", json={**body, "max_tokens": 5, "stream": False})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5


def test_chat_without_max_tokens_fills_what_the_kv_holds(colocated):
    # Left out, max_tokens is "as many as fit": here the 64-token KV cache, not the 512-token context.
    srv, model = colocated
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=TIMEOUT, trust_env=False)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == KV + 1
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_unknown_model_is_404(colocated):
    srv, model = colocated
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT, trust_env=False) as c:
        for path, body in (("/v1/completions", {"model": "gpt-4", "prompt": "hi", "max_tokens": 2}),
                           ("/v1/chat/completions", {"model": "gpt-4", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "hi"}]})):
            err = _error(c.post(path, json=body), 404)
            assert err["code"] == "model_not_found" and err["param"] == "model"
            assert err["type"] == "invalid_request_error"


def test_colocated_health_ok(colocated):
    srv, _ = colocated
    r = httpx.get(srv.url + "/health", timeout=TIMEOUT, trust_env=False)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_sigterm_reports_draining_and_finishes_in_flight():
    """SIGTERM: /health answers 503 "draining", new requests 503, the in-flight stream completes."""
    folder = "demo"  # slow enough on CPU that the stream is still running while we look
    with running_server(["serve", "--role", "colocated", "--model", folder, "--threads", "1"]) as srv:
        got: dict[str, object] = {}
        first = threading.Event()

        def stream() -> None:
            body = {"model": folder, "prompt": [5, 6, 7], "max_tokens": 150, "ignore_eos": True,
                    "temperature": 0, "stream": True}
            n = 0
            with httpx.Client(timeout=TIMEOUT, trust_env=False) as c, \
                    c.stream("POST", srv.url + "/v1/completions", json=body) as r:
                got["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        n += 1
                        first.set()
                    got["last"] = line or got.get("last")
            got["chunks"] = n

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(TIMEOUT), "no token streamed"
        srv.proc.send_signal(signal.SIGTERM)
        with httpx.Client(timeout=TIMEOUT, trust_env=False) as c:
            _wait_for(lambda: c.get(srv.url + "/health").status_code == 503, what="/health 503 while draining")
            h = c.get(srv.url + "/health").json()
            assert h["status"] == "draining" and "draining" in h["reason"]
            err = _error(c.post(srv.url + "/v1/completions", json={"model": folder, "prompt": [5], "max_tokens": 2}),
                         503)
            assert "draining" in err["message"]
            assert srv.alive()  # still finishing the stream
        t.join(TIMEOUT)
        assert not t.is_alive()
        assert got["status"] == 200 and got["last"] == "data: [DONE]" and got["chunks"] >= 140
        srv.proc.wait(timeout=30)  # then it exits by itself


# ---- a cluster: router over prefill, decode and colocated workers ---------------------------

def _worker(role: str, folder: str, blocks: int, port: int) -> Server:
    args = ["serve", "--role", role, "--model", folder, "--threads", "1", "--num-blocks", str(blocks),
            "--block-size", "16", "--host", HOST, "--port", str(port)]
    if role == "colocated":
        args.append("--internal")
    return start_server(args, port_flag=None)


def _ready(w: Server, timeout: float = 120.0) -> None:
    _wait_for(lambda: "READY" in w.output() or not w.alive(), timeout, f"{w.args} READY")
    assert w.alive(), w.tail()


@pytest.fixture(scope="module")
def cluster(tiny_models):  # type: ignore[no-untyped-def]
    """Prefill holds 48 tokens of KV, decode and colocated 64; prompts under 40 tokens go whole
    to the colocated worker, the others are disaggregated."""
    folder = str(tiny_models["llama"])
    spec = {"prefill": 3, "decode": 4, "colocated": 4}
    ports = {role: free_port() for role in spec}
    workers = {role: _worker(role, folder, n, ports[role]) for role, n in spec.items()}
    try:
        for w in workers.values():
            _ready(w)
        args = ["router", "--model", folder, "--disagg-threshold", "40",
                *(x for role in spec for x in (f"--{role}", f"{HOST}:{ports[role]}"))]
        with running_server(args) as router:
            yield router, folder, workers, spec, ports
    finally:
        for w in workers.values():
            w.stop()


@pytest.mark.parametrize("prompt_len,max_tokens,who,words", [
    (20, 50, "colocated", "KV for 69 tokens"),  # whole on the colocated worker: 20 + 50 - 1 > 64
    (50, 20, "decode", "KV for 69 tokens"),  # the decode reservation's sequence does not fit
    (50, 2, "prefill", "KV for 50 tokens"),  # decode could, the prefill worker's 48 cannot
])
def test_router_refuses_what_no_worker_can_finish(cluster, prompt_len, max_tokens, who, words):
    router, model, *_ = cluster
    body = {"model": model, "prompt": [5] * prompt_len, "max_tokens": max_tokens, "ignore_eos": True}
    with httpx.Client(base_url=router.url, timeout=TIMEOUT, trust_env=False) as c:
        err = _error(c.post("/v1/completions", json=body), 400)
        assert err["type"] == "invalid_request_error"
        assert who in err["message"] and words in err["message"], err
        # Each path still serves what fits. (The refused request's decode reservation is freed by an
        # Abort the decode worker applies between engine steps: a Reserve right behind it may still
        # find the blocks taken and get a 503 "retry shortly", so retry the way a client would.)
        ok = {**body, "prompt": [5] * (20 if who == "colocated" else 40), "max_tokens": 5}
        for _ in range(20):
            r = c.post("/v1/completions", json=ok)
            if r.status_code != 503:
                break
            time.sleep(0.2)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5, r.text


def test_router_unknown_model_is_404(cluster):
    router, *_ = cluster
    r = httpx.post(router.url + "/v1/completions", json={"model": "nope", "prompt": "hi"}, timeout=TIMEOUT,
                   trust_env=False)
    assert _error(r, 404)["code"] == "model_not_found"


def test_router_health_follows_the_workers(cluster):
    """Kill the only decode worker, then the colocated one: /health goes from ok to degraded to 503
    within a few heartbeats; restart them and it comes back."""
    router, folder, workers, spec, ports = cluster

    def health() -> tuple[int, dict]:
        r = httpx.get(router.url + "/health", timeout=TIMEOUT, trust_env=False)
        return r.status_code, r.json()

    status, body = health()
    assert status == 200 and body["status"] == "ok", body
    assert body["roles"] == {r: {"available": 1, "total": 1} for r in spec}

    workers["decode"].proc.send_signal(signal.SIGKILL)
    _wait_for(lambda: health()[1]["status"] == "degraded", 10, "degraded once decode is gone")
    status, body = health()
    assert status == 200 and "decode" in body["reason"]  # the colocated worker still serves
    assert {w["role"]: w["state"] for w in body["workers"]}["decode"] == "down"

    workers["colocated"].proc.send_signal(signal.SIGKILL)
    _wait_for(lambda: health()[0] == 503, 10, "503 once decode and colocated are gone")
    body = health()[1]
    assert body["status"] == "unavailable"
    assert "colocated" in body["reason"] and "decode" in body["reason"], body
    r = httpx.post(router.url + "/v1/completions", json={"model": folder, "prompt": [5] * 40, "max_tokens": 2},
                   timeout=TIMEOUT, trust_env=False)
    assert r.status_code == 503  # /health told the truth

    for role in ("decode", "colocated"):  # both restart side by side
        workers[role].stop()
        workers[role] = _worker(role, folder, spec[role], ports[role])
    for role in ("decode", "colocated"):
        _ready(workers[role])
    _wait_for(lambda: health()[1]["status"] == "ok", 20, "ok after the restarts")
    r = httpx.post(router.url + "/v1/completions", json={"model": folder, "prompt": [5] * 40, "max_tokens": 2},
                   timeout=TIMEOUT, trust_env=False)
    assert r.status_code == 200, r.text
