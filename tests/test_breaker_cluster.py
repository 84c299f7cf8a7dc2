"""Circuit breakers in a real cluster: a worker whose breaker opened serves again after a probe
that ends on a stop string; a worker that refuses because it is full is overloaded, not failing."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.servers import Server, start_workers
from tests.test_cluster import _up, _wait_for, _worker_gauge
from tests.test_faults import _pids

pytestmark = pytest.mark.slow
RESET_S = 4.0  # --breaker-reset-s: longer than the burst below takes to fail, with room


def _post(url: str, body: dict) -> httpx.Response:  # type: ignore[type-arg]
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


def _role_gauge(url: str, name: str, role: str) -> float:
    (value,) = [v for w, v in _worker_gauge(url, name).items() if w.startswith(role + "@")]
    return value


def test_half_open_probe_ending_on_a_stop_string_lets_the_worker_serve_again(tiny_models):
    """1P1D. The decode worker hangs (SIGSTOP) while requests reserve on it: their Reserves time
    out, its breaker opens. It comes back (SIGCONT; heartbeats fine). After the reset time, one
    request is the half-open probe, and it ends on a stop string. Before the fix that probe
    recorded no outcome, the breaker stayed half-open with its probe "in flight" forever, and
    every later request failed with 503 "no worker is available"."""
    from transformers import AutoTokenizer

    folder = tiny_models["llama"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = str(folder)
    base = {"model": model, "prompt": [5, 6, 7, 8, 9], "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    # A 4 s reset time (5 s by default) the test waits out. No waiting for room after a failed
    # Reserve: the burst fails at one Reserve timeout (2 s), so the breaker is still open when it is
    # read (with the 5 s wait, retried Reserves ended the burst near a 2 s reset time: flaky).
    with _up(model, "--prefill", "1", "--decode", "1", "--colocated", "0", "--breaker-reset-s", str(RESET_S),
             "--reserve-wait-s", "0") as srv:
        ref = _post(srv.url, {**base, "return_token_ids": True})
        assert ref.status_code == 200, ref.text
        ids = ref.json()["choices"][0]["token_ids"]
        # The stop string: the text the 4th..6th generated tokens add, so the stream stops in decode.
        stop = next(s for k in range(4, 12)
                    if (s := tok.decode(ids[:k + 1], skip_special_tokens=True)[
                        len(tok.decode(ids[:k], skip_special_tokens=True)):].strip()))
        decode_pid = _pids(srv.output())["decode-0"]

        os.kill(decode_pid, signal.SIGSTOP)
        try:
            async def burst() -> list[int]:
                async with httpx.AsyncClient(timeout=120) as client:
                    rs = await asyncio.gather(*(client.post(srv.url + "/v1/completions", json=base)
                                                for _ in range(6)))
                return [r.status_code for r in rs]

            codes = asyncio.run(burst())  # each Reserve times out: a fault of the decode worker
        finally:
            os.kill(decode_pid, signal.SIGCONT)
        assert codes == [503] * 6
        assert _role_gauge(srv.url, "breaker_state", "decode") == 2.0  # open
        opened = time.monotonic()
        _wait_for(lambda: _role_gauge(srv.url, "up", "decode") == 1.0)  # heartbeats are fine again
        time.sleep(max(0.0, opened + RESET_S + 0.5 - time.monotonic()))  # the breaker's reset time

        probe = _post(srv.url, {**base, "stop": [stop]})
        assert probe.status_code == 200, probe.text
        assert probe.json()["choices"][0]["finish_reason"] == "stop"
        assert probe.json()["usage"]["completion_tokens"] < 16  # it did end on the stop string

        for _ in range(3):
            r = _post(srv.url, {**base, "return_token_ids": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == ids
        assert _role_gauge(srv.url, "breaker_state", "decode") == 0.0  # closed


def test_queue_full_refusals_do_not_open_the_breaker(tiny_models):
    """A prefill worker whose queue is full refuses every request ("overloaded"): the router serves
    the request elsewhere (here whole, on the decode worker), and the prefill worker's breaker stays
    closed (before the fix, three refusals opened it: a busy worker shut out as if it had failed)."""
    model = str(tiny_models["llama"])
    env = {**os.environ, "PDSERVE_CLUSTER_SECRET": "s3cret", "OMP_NUM_THREADS": "1"}
    procs: list[Server] = []
    try:
        procs += start_workers([("prefill", model, "--max-waiting", "0"),  # every request: "queue full"
                                ("decode", model)], env=env)
        prefill, decode = (p.url for p in procs)
        from tests.servers import running_server

        args = ["router", "--model", model, "--prefill", prefill, "--decode", decode]
        with running_server(args, env=env, timeout=120) as srv:
            for _ in range(4):
                r = _post(srv.url, {"model": model, "prompt": [5, 6, 7], "max_tokens": 4})
                assert r.status_code == 200, r.text
            assert "queue full" in srv.output()  # the router did try the prefill worker
            assert _role_gauge(srv.url, "breaker_state", "prefill") == 0.0
            assert _role_gauge(srv.url, "breaker_state", "decode") == 0.0
    finally:
        for p in procs:
            p.stop(0)
