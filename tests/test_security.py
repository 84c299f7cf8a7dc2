"""Security: the router's API key, HMAC-authenticated internal frames, hostile frames, no pickle."""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

import httpx
import msgspec
import pytest

from pdserve.serve import messages as m
from pdserve.transfer.frames import HEAD_LEN, MAGIC, encode_frame, read_frame_sync, write_frame_sync
from tests.servers import running_server, start_workers, wait_output
from tests.test_cluster import URL_RE

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SECRET = b"security-cluster-secret"  # given to `up`, so the test can ask its workers the truth


def test_no_pickle_anywhere_in_pdserve():
    bad = [str(p.relative_to(ROOT)) for p in (ROOT / "pdserve").rglob("*.py")
           if re.search(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b", p.read_text(), re.M)]
    assert bad == []


# ---- raw frames --------------------------------------------------------------------------------

def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(5)
    return s


def _closed_without_reply(s: socket.socket) -> bool:
    """True if the peer closes the connection and sent nothing (a reply would be data)."""
    try:
        data = s.recv(1 << 16)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False  # still open after 5 s: not rejected
    return data == b""


def _send_raw(port: int, header: bytes, secret: bytes | None) -> socket.socket:
    s = _connect(port)
    write_frame_sync(s, header, b"", secret)
    return s


def _ask_stats(port: int, secret: bytes | None) -> m.Stats:
    with _connect(port) as s:
        write_frame_sync(s, m.encode(m.StatsQuery("probe")), b"", secret)
        header, _ = read_frame_sync(s, secret=secret)
    reply = m.decode_to_router(header)
    assert isinstance(reply, m.Stats) and reply.nonce == "probe"
    return reply


def _worker_port(output: str, role: str) -> int:
    match = re.search(rf"READY {role} [0-9.]+:(\d+) pid=\d+", output)
    assert match, output[-2000:]
    return int(match.group(1))


# ---- through `pdserve up` ----------------------------------------------------------------------

@pytest.mark.slow
def test_api_key_and_unauthenticated_frames(tiny_models):
    folder = str(tiny_models["llama"])
    body = {"model": folder, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
    chat = {"model": folder, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    args = ["up", "--model", folder, "--threads", "1", "--port", "0", "--prefill", "1", "--decode", "1",
            "--api-key", "secret"]
    with running_server(args, env={"PDSERVE_CLUSTER_SECRET": CLUSTER_SECRET.decode()}, port_flag=None,
                        url_pattern=URL_RE, timeout=240) as srv:
        with httpx.Client(timeout=60, trust_env=False) as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"},
                            {"Authorization": "Bearer secret2"}, {"Authorization": "bearer secret"}):
                for path, b in (("/v1/completions", body), ("/v1/chat/completions", chat)):
                    r = c.post(srv.url + path, json=b, headers=headers)
                    assert r.status_code == 401, (path, headers, r.status_code)
                    err = r.json()["error"]
                    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
                    assert isinstance(err["message"], str) and err["message"]
                assert c.get(srv.url + "/v1/models", headers=headers).status_code == 401
            # Open endpoints stay open.
            assert c.get(srv.url + "/health").status_code == 200
            assert c.get(srv.url + "/metrics").status_code == 200
            ok = {"Authorization": "Bearer secret"}
            r = c.post(srv.url + "/v1/completions", json=body, headers=ok)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
            assert c.post(srv.url + "/v1/chat/completions", json=chat, headers=ok).status_code == 200
            assert c.get(srv.url + "/v1/models", headers=ok).status_code == 200

            # Internal frames without the cluster secret `up` generated: closed, never answered.
            out = srv.output()
            before = {role: _ask_stats(_worker_port(out, role), CLUSTER_SECRET) for role in ("decode", "prefill")}
            for role in ("decode", "prefill"):
                port = _worker_port(out, role)
                for secret in (None, b"not-the-secret"):
                    for msg in (m.StatsQuery("x"), m.Abort("anything"),
                                m.Reserve("evil", [5, 6, 7], m.Params(max_tokens=4))):
                        with _send_raw(port, m.encode(msg), secret) as s:
                            assert _closed_without_reply(s), (role, secret, msg)
            # A worker's log line reaches `up`'s output later than its closed socket reaches us: wait for it.
            wait_output(srv, "frame authentication failed|rejected a frame", timeout=15)
            # Nothing was reserved by the forged Reserves (asked with the real secret), and the
            # cluster still serves.
            for role in ("decode", "prefill"):
                now = _ask_stats(_worker_port(out, role), CLUSTER_SECRET)
                assert (now.free_blocks, now.reserved, now.running) == (
                    before[role].free_blocks, 0, 0), (role, now, before[role])
            r = c.post(srv.url + "/v1/completions", json=body, headers=ok)
            assert r.status_code == 200


# ---- one worker we start ourselves, so we know its secret ----------------------------------------

SECRET = b"s3cret"


@pytest.fixture(scope="module")
def workers(tiny_models):  # type: ignore[no-untyped-def]
    folder = str(tiny_models["llama"])
    procs = {}
    try:
        roles = ("decode", "prefill")
        started = start_workers([(role, folder) for role in roles], env={"PDSERVE_CLUSTER_SECRET": SECRET.decode()})
        procs = dict(zip(roles, started, strict=True))
        yield {role: srv.port for role, srv in procs.items()}, procs
    finally:
        for srv in procs.values():
            srv.stop(5)


@pytest.mark.slow
def test_right_secret_answers_wrong_secret_does_not(workers):
    ports, _ = workers
    for port in ports.values():
        stats = _ask_stats(port, SECRET)
        assert stats.total_blocks > 0
        for secret in (None, b"s3cret ", b"S3CRET"):
            with _send_raw(port, m.encode(m.StatsQuery("x")), secret) as s:
                assert _closed_without_reply(s)
        # A right tag over a frame whose bytes were changed after signing is rejected too.
        with _connect(port) as s:
            frame = bytearray(b"".join(bytes(b) for b in encode_frame(m.encode(m.StatsQuery("x")), b"", SECRET)))
            frame[-1] ^= 1
            s.sendall(frame)
            assert _closed_without_reply(s)


def _hostile_frames() -> list[tuple[str, bytes]]:
    params = {"max_tokens": 4}
    enc = msgspec.msgpack.encode
    return [
        ("garbage header", b"\xc1\xff\x00garbage"),
        ("empty header", b""),
        ("not msgpack at all", b"GET / HTTP/1.1\r\n\r\n"),
        ("unknown tag", enc({"type": "launch_missiles", "request_id": "r"})),
        ("no tag", enc({"request_id": "r", "prompt_token_ids": [1, 2]})),
        ("wrong field types", enc({"type": "stats_query", "nonce": 5})),
        ("wrong nested types", enc({"type": "reserve", "request_id": "r", "prompt_token_ids": "abc",
                                    "params": params})),
        ("params not a map", enc({"type": "generate", "request_id": "r", "prompt_token_ids": [1],
                                  "params": [1, 2, 3]})),
        ("missing fields", enc({"type": "prefill", "request_id": "r"})),
        ("a list, not a map", enc([1, 2, 3])),
        ("deep nesting", enc({"type": "abort", "request_id": [[[[[[[[]]]]]]]]})),
    ]


def _hostile_but_valid_messages() -> list[tuple[str, m.ToWorker]]:
    """Schema-valid messages with hostile values: each must get an error reply, or nothing at all."""
    P = m.Params
    return [
        ("reserve negative ids", m.Reserve("neg", [5, -1, 7], P(max_tokens=4))),
        ("reserve ids past vocab", m.Reserve("big", [5, 2**40], P(max_tokens=4))),
        ("reserve empty prompt", m.Reserve("empty", [], P(max_tokens=4))),
        ("reserve zero max_tokens", m.Reserve("zero", [5, 6], P(max_tokens=0))),
        ("reserve nan temperature", m.Reserve("nan", [5, 6], P(max_tokens=4, temperature=float("nan")))),
        ("reserve negative top_k", m.Reserve("topk", [5, 6], P(max_tokens=4, top_k=-7))),
        ("reserve past context", m.Reserve("ctx", [5] * 10, P(max_tokens=2**40))),
        ("generate negative ids", m.Generate("gneg", [-3], P(max_tokens=4))),
        ("generate bad top_p", m.Generate("gtopp", [5], P(max_tokens=4, top_p=0.0))),
        ("prefill bad ids", m.Prefill("pneg", [-1], P(max_tokens=4), "127.0.0.1:1", [0], 16)),
        ("start unknown request", m.Start("nobody", 5)),
        ("abort unknown request", m.Abort("nobody")),
        ("renew unknown request", m.Renew("nobody")),
    ]


SILENT_BY_DESIGN = {"start unknown request", "abort unknown request", "renew unknown request"}  # no reply is defined


def _reply_or_close(s: socket.socket, wait: float) -> object:
    """One reply (decoded), or 'closed', or 'silent' if the worker sent nothing for `wait` s."""
    s.settimeout(wait)
    try:
        header, _ = read_frame_sync(s, secret=SECRET)
    except (EOFError, ConnectionResetError):
        return "closed"
    except TimeoutError:
        return "silent"
    return m.decode_to_router(header)


@pytest.mark.slow
def test_malformed_authenticated_frames_are_rejected(workers):
    ports, procs = workers
    for role, port in ports.items():
        free0 = _ask_stats(port, SECRET).free_blocks
        for name, header in _hostile_frames():
            with _send_raw(port, header, SECRET) as s:
                assert _closed_without_reply(s), (role, name)
            assert _ask_stats(port, SECRET).free_blocks == free0, (role, name)  # still answers, nothing held
        # Frame-level attacks: a huge length prefix (no allocation, closed), bad magic, a truncated frame.
        for name, raw in (("huge length", struct.pack("!4sII", MAGIC, 2**31, 2**31) + bytes(32)),
                          ("over the control limit", struct.pack("!4sII", MAGIC, 17 * 1024 * 1024, 0) + bytes(32)),
                          ("bad magic", struct.pack("!4sII", b"EVIL", 2, 0) + bytes(32) + b"\x80\x80")):
            with _connect(port) as s:
                s.sendall(raw)
                assert _closed_without_reply(s), (role, name)
        with _connect(port) as s:  # a truncated frame then a hang-up: no effect on the worker
            s.sendall(struct.pack("!4sII", MAGIC, 100, 0)[: HEAD_LEN - 40])
        # Schema-valid messages with hostile values: an error reply (or silence), never a crash or a leak.
        for name, msg in _hostile_but_valid_messages():
            with _connect(port) as s:
                write_frame_sync(s, m.encode(msg), b"", SECRET)
                reply = _reply_or_close(s, 1.0 if name in SILENT_BY_DESIGN else 30.0)
            if name in SILENT_BY_DESIGN:
                assert reply == "silent", (role, name, reply)
            elif isinstance(reply, m.Reserved):
                assert not reply.ok and reply.request_id == msg.request_id, (role, name, reply)  # type: ignore[union-attr]
            else:  # an error for that request: a handler that hangs or drops it fails here
                assert isinstance(reply, m.Tokens), (role, name, reply)
                assert reply.error and not reply.token_ids and reply.request_id == msg.request_id, (role, name, reply)  # type: ignore[union-attr]
            stats = _ask_stats(port, SECRET)
            assert stats.free_blocks == free0 and stats.running == 0, (role, name, stats)
        assert procs[role].alive(), procs[role].tail()
        assert "Traceback" not in procs[role].output(), procs[role].output()[-3000:]  # rejected, not crashed
        assert "rejected a malformed control message" in procs[role].output()
