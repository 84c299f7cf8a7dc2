"""Fuzzing the HTTP API: hypothesis-made bodies against one real colocated server.

Whatever the body (real field names with wrong, edge or junk values; non-object JSON; bytes that are
not JSON at all), the server answers 200 or a 4xx with an OpenAI error body: never a 5xx, never a
hang, and it is still serving afterwards.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.servers import running_server

pytestmark = pytest.mark.slow
TIMEOUT = 60.0  # a client timeout: a hang fails the test instead of stalling it

FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "n", "stream", "stream_options", "stop", "stop_token_ids", "seed", "min_tokens",
          "ignore_eos", "echo", "logprobs", "presence_penalty", "frequency_penalty", "return_token_ids",
          "user", "suffix", "logit_bias"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63, -(2**63), 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "\x00", "\u202e", "user", "system", "text", "demo"]),
)
junk = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS + ["role", "content", "type", "text",
                                                                           "include_usage"]), inner, max_size=4)),
    max_leaves=12)


@pytest.fixture(scope="module")
def server(tiny_models):  # type: ignore[no-untyped-def]
    folder = str(tiny_models["llama"])
    with running_server(["serve", "--role", "colocated", "--model", folder, "--threads", "1"]) as srv:
        yield srv, folder


def _bodies(model: str, chat: bool) -> st.SearchStrategy:
    prompt = st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 70000), max_size=8),
                       st.lists(st.text(max_size=8), max_size=3), junk)
    message = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bogus"]),
                                               "content": st.one_of(st.text(max_size=20), junk)}), junk)
    base = {"model": st.one_of(st.just(model), st.just(model), junk)}
    if chat:
        base["messages"] = st.one_of(st.lists(message, min_size=1, max_size=3), junk)
    else:
        base["prompt"] = prompt
    valid_ish = st.fixed_dictionaries(base, optional={f: junk for f in FIELDS if f not in base})
    return st.one_of(valid_ish, valid_ish, st.dictionaries(st.sampled_from(FIELDS), junk, max_size=6), junk)


def _small(body):  # type: ignore[no-untyped-def]
    """Keep successful requests quick: at most 4 new tokens, whatever else the body says."""
    if isinstance(body, dict):
        mt = body.get("max_tokens")
        if mt is None:
            body["max_tokens"] = 3
        elif isinstance(mt, int) and not isinstance(mt, bool) and mt > 4:
            body["max_tokens"] = 4
    return body


def _check(r: httpx.Response, body: object) -> None:
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, body, r.text[:500])
    if r.status_code == 200:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
            assert events, r.text
            # A stream ends with [DONE] or with an OpenAI error event (never a 5xx mid-way for junk input).
            last = events[-1]
            if last != "[DONE]":
                err = json.loads(last)["error"]
                assert isinstance(err["message"], str)
        else:
            assert "choices" in r.json()
        return
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)


def _post(url: str, path: str, body: object) -> httpx.Response:
    content = json.dumps(body).encode()  # NaN and Infinity go out as Python's json writes them
    with httpx.Client(timeout=TIMEOUT, trust_env=False) as client:
        return client.post(url + path, content=content, headers={"content-type": "application/json"})


FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@FUZZ
@given(data=st.data())
def test_fuzz_completions(server, data):  # type: ignore[no-untyped-def]
    srv, model = server
    body = _small(data.draw(_bodies(model, chat=False)))
    _check(_post(srv.url, "/v1/completions", body), body)


@FUZZ
@given(data=st.data())
def test_fuzz_chat(server, data):  # type: ignore[no-untyped-def]
    srv, model = server
    body = _small(data.draw(_bodies(model, chat=True)))
    _check(_post(srv.url, "/v1/chat/completions", body), body)


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=64), st.text(max_size=40).map(str.encode)),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzz_raw_bytes(server, raw, path):  # type: ignore[no-untyped-def]
    srv, _ = server
    with httpx.Client(timeout=TIMEOUT, trust_env=False) as client:
        r = client.post(srv.url + path, content=raw, headers={"content-type": "application/json"})
    _check(r, raw)


def test_edge_bodies_and_server_alive(server):  # type: ignore[no-untyped-def]
    """Hand-picked edges, then a normal request still works and the server process is alive."""
    srv, model = server
    edges = [
        {"model": model, "prompt": "hi", "max_tokens": 2, "temperature": float("nan")},
        {"model": model, "prompt": "hi", "max_tokens": 2, "top_p": float("inf")},
        {"model": model, "prompt": "hi", "max_tokens": 2**64},
        {"model": model, "prompt": [2**63], "max_tokens": 2},
        {"model": model, "prompt": [[]], "max_tokens": 2},
        {"model": model, "prompt": "hi", "max_tokens": 2, "seed": -(2**80), "temperature": 1.0},
        {"model": model, "prompt": "hi", "max_tokens": 2, "stop": [""] * 3},
        {"model": model, "prompt": "hi", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": 1}},
        {"model": model, "prompt": "x" * 100_000, "max_tokens": 2},
        [], "null", 0, {"model": None},
    ]
    for body in edges:
        _check(_post(srv.url, "/v1/completions", body), body)
    big = b'{"model": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    with httpx.Client(timeout=TIMEOUT, trust_env=False) as client:
        r = client.post(srv.url + "/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.status_code
        ok = client.post(srv.url + "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert srv.alive()
