"""`pdserve up` as a user drives it: YAML and flags, the API key, the deadline, attempts running out,
the shm transport, and SIGTERM stopping the whole cluster. One 1P1D cluster (demo model) serves
every test here; they run in file order.

The configuration is checked through what `up` does (workers it starts, the port it serves on, the
key it accepts, the transport its workers use), not through the config classes, which may change.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests import probes
from tests.procs import alive
from tests.servers import Server, running_server

pytestmark = pytest.mark.slow

SECRET = "up-behaviour-secret"
KEY = "key-from-flag"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Every request of this module runs under these (and max_attempts 1), so they leave a loaded
# machine room for a short request; the 1,900-token generation still takes far longer (~40 s).
REQUEST_TIMEOUT_S = 6.0
FIRST_TOKEN_TIMEOUT_S = 3.0
MODEL = "demo"
# Flags must win over every one of these.
YAML = f"""\
decode: {{workers: 3}}
transfer: {{transport: tcp}}
router: {{port: 1, api_key: key-from-yaml, request_timeout_s: {REQUEST_TIMEOUT_S},
          first_token_timeout_s: {FIRST_TOKEN_TIMEOUT_S}, max_attempts: 1}}
"""


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cfg = tmp_path_factory.mktemp("up-behaviour") / "cluster.yaml"
    cfg.write_text(YAML)
    args = ["up", "--config", str(cfg), "--model", MODEL, "--threads", "1", "--prefill", "1", "--decode", "1",
            "--transport", "shm", "--port", "0", "--api-key", KEY]
    with running_server(args, env={"PDSERVE_CLUSTER_SECRET": SECRET}, port_flag=None,
                        url_pattern=r"serving \S+ at (http://[0-9.:]+)/v1", timeout=240) as srv:
        probes.wait_for(lambda: set(probes.worker_gauge(srv.url, "up").values()) == {1.0}, 20, "workers up")
        yield srv


def _post(srv: Server, body: dict, headers: dict | None = None, timeout: float = 60) -> httpx.Response:  # type: ignore[type-arg]
    return httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "temperature": 0, **body},
                      headers=AUTH if headers is None else headers, timeout=timeout, trust_env=False)


def _free(srv: Server) -> dict[str, int]:
    return {n: probes.stats(w.port, SECRET.encode()).free_blocks for n, w in probes.workers_of(srv.output()).items()}


def test_unknown_yaml_key_is_refused(tmp_path: Path) -> None:
    """A typo in the cluster file stops `up` before it starts anything, naming the key."""
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("decode: {workers: 1, max_batch_sise: 8}\n")
    r = subprocess.run([sys.executable, "-m", "pdserve.cli", "up", "--config", str(cfg), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr  # refused as a usage error, not a crash (1)
    assert "max_batch_sise" in r.stderr and "Traceback" not in r.stderr
    assert "serving" not in r.stdout + r.stderr and "READY" not in r.stdout + r.stderr


def test_flags_win_over_yaml(up: Server) -> None:
    workers = probes.workers_of(up.output())
    assert sorted(workers) == ["decode-0", "prefill-0"]  # --decode 1, not the file's 3
    assert sorted(probes.worker_gauge(up.url, "up")) == sorted(w.router_name for w in workers.values())
    assert httpx.URL(up.url).port != 1  # --port 0 picked a free port; the file said 1
    assert _post(up, {"prompt": [5, 6, 7], "max_tokens": 2}).status_code == 200  # --api-key ...
    assert _post(up, {"prompt": [5, 6, 7], "max_tokens": 2},
                 {"Authorization": "Bearer key-from-yaml"}).status_code == 401  # ...not the file's key


def test_shm_transport_is_used(up: Server) -> None:
    """--transport shm (over the file's tcp): the prefill worker stages KV in a shared-memory segment
    it owns, and the decode worker maps it."""
    workers = probes.workers_of(up.output())
    r = _post(up, {"prompt": list(range(3, 200)), "max_tokens": 4})
    assert r.status_code == 200 and "transfer" in r.json()["timings"][0]
    prefill, decode = workers["prefill-0"].pid, workers["decode-0"].pid
    segments = [p.name for p in Path("/dev/shm").glob(f"pdkv_{prefill}_*")]
    assert segments, "no shared-memory segment of the prefill worker"
    maps = Path(f"/proc/{decode}/maps").read_text()
    assert any(name in maps for name in segments), "the decode worker never mapped the segment"


def test_admin_workers_requires_the_api_key(up: Server) -> None:
    address = probes.workers_of(up.output())["decode-0"].address
    body = {"role": "decode", "address": address}
    for headers in ({}, {"Authorization": "Bearer key-from-yaml"}):
        r = httpx.post(up.url + "/admin/workers", json=body, headers=headers, timeout=30, trust_env=False)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert len(probes.worker_gauge(up.url, "up")) == 2  # nothing was added
    r = httpx.post(up.url + "/admin/workers", json=body, headers=AUTH, timeout=30, trust_env=False)
    assert r.status_code == 200 and r.json()["up"] is True, r.text
    assert len(probes.worker_gauge(up.url, "up")) == 2  # the same worker, not a second copy


def test_request_deadline_gives_504(up: Server) -> None:
    """A generation that would take ~40 s ends with 504 at request_timeout_s; its blocks come back."""
    start = _free(up)
    t0 = time.monotonic()
    r = _post(up, {"prompt": [5, 6, 7, 8], "max_tokens": 1900, "ignore_eos": True})
    elapsed = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert r.json()["error"]["message"]
    assert REQUEST_TIMEOUT_S <= elapsed
    # Streaming: the status line went out with the first token, so the deadline is an error event.
    with httpx.stream("POST", up.url + "/v1/completions", headers=AUTH, timeout=60, trust_env=False,
                      json={"model": MODEL, "prompt": [5, 6, 7, 9], "max_tokens": 1900, "ignore_eos": True,
                            "stream": True}) as s:
        text = s.read().decode()
    assert s.status_code == 200
    assert '"error"' in text and "deadline" in text
    probes.wait_for(lambda: _free(up) == start, 5.0, "blocks back after the deadline")


def test_attempts_running_out_give_503(up: Server) -> None:
    """max_attempts 1 and a silent prefill worker: after first_token_timeout_s the client gets a
    503 with Retry-After (not a hang), and the decode reservation is freed while prefill is silent."""
    workers = probes.workers_of(up.output())
    start = _free(up)
    p = workers["prefill-0"]
    os.kill(p.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = _post(up, {"prompt": [5, 6, 7, 8], "max_tokens": 8})
        elapsed = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert "attempt" in r.json()["error"]["message"]
        assert FIRST_TOKEN_TIMEOUT_S <= elapsed < REQUEST_TIMEOUT_S  # gave up on attempts, not the deadline
        d = workers["decode-0"]
        probes.wait_for(lambda: probes.stats(d.port, SECRET.encode()).free_blocks == start[d.name], 10.0,
                        "the decode reservation freed while prefill is still silent")  # not at the 30 s expiry
    finally:
        os.kill(p.pid, signal.SIGCONT)
    probes.wait_for(lambda: set(probes.worker_gauge(up.url, "up").values()) == {1.0}, 10, "prefill back")
    assert _post(up, {"prompt": [5, 6, 7, 8], "max_tokens": 8}).status_code == 200


def test_sigterm_stops_up_and_its_workers(up: Server) -> None:
    pids = [w.pid for w in probes.workers_of(up.output()).values()]
    assert all(alive(pid) for pid in pids)
    os.kill(up.proc.pid, signal.SIGTERM)
    assert up.proc.wait(timeout=60) == 0, up.tail()
    assert [pid for pid in pids if alive(pid)] == []  # stopped (and waited for) before `up` exits
