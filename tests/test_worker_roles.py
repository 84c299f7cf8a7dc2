"""Worker roles as real processes: what each role takes and refuses, and how a decode worker drains.

A decode worker holding a reservation is told to stop (SIGTERM): until the reservation ends it
keeps answering, says `draining` in its Stats, and refuses new work as draining; once the
router releases the reservation it exits cleanly.
"""

from __future__ import annotations

import signal
import socket
import time

import pytest

from pdserve.serve import messages as m
from pdserve.serve.pd_worker import ROLES, make_worker
from pdserve.transfer.frames import read_frame_sync, write_frame_sync
from tests.servers import Server, free_port, start_server

SECRET = b"roles-secret"
PARAMS = m.Params(max_tokens=4, temperature=0.0)


def _start(folder: str, role: str) -> tuple[Server, int]:
    port = free_port()
    srv = start_server(["serve", "--role", role, "--internal", "--model", folder, "--threads", "1",
                        "--port", str(port), "--host", "127.0.0.1"],
                       env={"PDSERVE_CLUSTER_SECRET": SECRET.decode()}, port_flag=None)
    return srv, port


def _wait_ready(srv: Server, role: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while f"READY {role}" not in srv.output():
        assert srv.alive(), srv.tail()
        assert time.monotonic() < deadline, srv.tail()
        time.sleep(0.2)


def _ask(sock: socket.socket, msg: m.ToWorker) -> m.ToRouter:
    """Send `msg`; its first reply (replies to earlier requests that stream in meanwhile are skipped)."""
    key = msg.nonce if isinstance(msg, m.StatsQuery) else msg.request_id  # type: ignore[union-attr]
    write_frame_sync(sock, m.encode(msg), b"", SECRET)
    while True:
        header, _ = read_frame_sync(sock, secret=SECRET)
        reply = m.decode_to_router(header)
        if (reply.nonce if isinstance(reply, m.Stats) else reply.request_id) == key:
            return reply


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.settimeout(30)
    return s


@pytest.fixture(scope="module")
def workers(tiny_models):  # type: ignore[no-untyped-def]
    folder = str(tiny_models["llama"])
    started = {role: _start(folder, role) for role in ("decode", "prefill")}
    try:
        for role, (srv, _) in started.items():
            _wait_ready(srv, role)
        yield started
    finally:
        for srv, _ in started.values():
            srv.stop(5)


def test_every_role_has_a_class_and_an_unknown_one_is_refused() -> None:
    assert set(ROLES) == {"colocated", "prefill", "decode"}
    assert all(cls.role == role for role, cls in ROLES.items())

    class Args:
        role = "router"

    with pytest.raises(ValueError, match="role must be one of"):
        make_worker(Args())  # type: ignore[arg-type]


@pytest.mark.slow
def test_each_role_refuses_the_other_roles_work(workers) -> None:  # type: ignore[no-untyped-def]
    _, prefill_port = workers["prefill"]
    _, decode_port = workers["decode"]
    with _connect(prefill_port) as s:
        stats = _ask(s, m.StatsQuery("p"))
        assert isinstance(stats, m.Stats) and stats.role == "prefill" and not stats.draining
        reply = _ask(s, m.Generate("g", [5, 6, 7], PARAMS))
        assert isinstance(reply, m.Tokens) and reply.error_kind == "invalid" and "prefill" in reply.error
        reply = _ask(s, m.Reserve("r", [5, 6, 7], PARAMS))
        assert isinstance(reply, m.Reserved) and not reply.ok and "does not take Reserve" in reply.reason
    with _connect(decode_port) as s:
        reply = _ask(s, m.Prefill("p", [5, 6, 7], PARAMS, "tcp://127.0.0.1:1", [0], 16))
        assert isinstance(reply, m.Tokens) and reply.error_kind == "invalid" and "decode" in reply.error
        reply = _ask(s, m.Generate("g", [5, 6, 7], PARAMS))  # a short prompt run whole on decode
        assert isinstance(reply, m.Tokens) and not reply.error
        stats = _ask(s, m.StatsQuery("d"))
        assert isinstance(stats, m.Stats) and stats.role == "decode" and stats.reserved == 0


@pytest.mark.slow
def test_a_draining_decode_worker_says_so_refuses_new_work_and_exits_when_idle(tiny_models) -> None:  # type: ignore[no-untyped-def]
    srv, port = _start(str(tiny_models["llama"]), "decode")
    try:
        _wait_ready(srv, "decode")
        with _connect(port) as s:
            held = _ask(s, m.Reserve("held", [5, 6, 7, 8], PARAMS))
            assert isinstance(held, m.Reserved) and held.ok
            stats = _ask(s, m.StatsQuery("before"))
            assert isinstance(stats, m.Stats) and not stats.draining and stats.reserved == 1
            srv.proc.send_signal(signal.SIGTERM)  # the reservation keeps it draining
            deadline = time.monotonic() + 30
            while True:
                stats = _ask(s, m.StatsQuery("during"))
                assert isinstance(stats, m.Stats)
                if stats.draining:
                    break
                assert time.monotonic() < deadline, srv.tail()
                time.sleep(0.05)
            assert srv.alive() and stats.reserved == 1
            refused = _ask(s, m.Reserve("new", [5, 6, 7], PARAMS))
            assert isinstance(refused, m.Reserved) and not refused.ok and "draining" in refused.reason
            refused_gen = _ask(s, m.Generate("gen", [5, 6, 7], PARAMS))
            assert isinstance(refused_gen, m.Tokens) and refused_gen.error_kind == "draining"
            write_frame_sync(s, m.encode(m.Abort("held")), b"", SECRET)  # the router lets go
            assert srv.proc.wait(timeout=30) == 0, srv.tail()
    finally:
        srv.stop(5)
