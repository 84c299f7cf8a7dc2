"""The colocated OpenAI server as a real process, driven by the official `openai` client and raw httpx."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import ServerError, running_server, start_server

pytestmark = pytest.mark.slow

MODEL = "demo"
CTX = 2048
SERVE = ["serve", "--role", "colocated", "--model", MODEL, "--threads", "1", "--num-blocks", "512"]
# Greedy outputs of `demo` for these prompts are plain text (no partial UTF-8 at the end).
PROMPTS = ["Hello world", "The capital of France is", "def fib(n):"]


@pytest.fixture(scope="module")
def stack():
    """The server under test and a second one with --api-key, started side by side while this
    process loads the same model offline for the expected outputs."""
    import pdserve

    main, auth = start_server(SERVE), start_server([*SERVE, "--api-key", "secret"])
    try:
        llm = pdserve.LLM(MODEL, num_blocks=256)
        main.wait_ready()
        auth.wait_ready()
        yield main, auth, llm
    finally:
        main.stop()
        auth.stop()


@pytest.fixture(scope="module")
def server(stack):
    return stack[0]


@pytest.fixture(scope="module")
def auth_server(stack):
    return stack[1]


@pytest.fixture(scope="module")
def llm(stack):
    return stack[2]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tok(llm):
    return llm.tokenizer


_greedy_cache: dict = {}


def greedy(llm, prompt, max_tokens, **kw):
    """The offline API's greedy output (cached: each costs a few seconds on 2 cores)."""
    import pdserve

    key = (tuple(prompt) if isinstance(prompt, list) else prompt, max_tokens, repr(sorted(kw.items())))
    if key not in _greedy_cache:
        params = pdserve.SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
        _greedy_cache[key] = llm.generate(prompt, params)[0].outputs[0]
    return _greedy_cache[key]


def chat_ids(tok, messages):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def metrics(http) -> dict[str, float]:
    """Every sample of /metrics as name{labels} -> value, parsed by prometheus_client."""
    r = http.get("/metrics")
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "?") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param != "?":
        assert err["param"] == param
    return err


# ---- completions and chat -------------------------------------------------------------------

@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_greedy_matches_offline(client, llm, tok, prompt):
    want = greedy(llm, prompt, 8)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    c = r.choices[0]
    assert c.text == want.text
    assert c.finish_reason == "length" == want.finish_reason
    assert r.usage.prompt_tokens == len(tok(prompt).input_ids)
    assert r.usage.completion_tokens == 8 == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.model == MODEL and r.object == "text_completion" and r.id.startswith("cmpl-")


def test_completion_stream_matches_offline(client, llm, tok):
    prompt = PROMPTS[1]
    want = greedy(llm, prompt, 8)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == want.text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert len({ch.id for ch in chunks}) == 1
    usage = [ch.usage for ch in chunks if ch.usage is not None]
    assert len(usage) == 1 and chunks[-1].usage is not None and chunks[-1].choices == []
    assert usage[0].prompt_tokens == len(tok(prompt).input_ids) and usage[0].completion_tokens == 8


def test_completion_token_id_prompt(client, llm, tok):
    ids = tok(PROMPTS[0]).input_ids
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == greedy(llm, PROMPTS[0], 8).text
    assert r.usage.prompt_tokens == len(ids)


def test_completion_batch_of_prompts(client, llm):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [greedy(llm, p, 8).text for p in PROMPTS[:2]]
    assert r.usage.completion_tokens == 16


def test_completion_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_chat_greedy_matches_offline(client, llm, tok):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    ids = chat_ids(tok, messages)
    want = greedy(llm, ids, 8)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    m = r.choices[0]
    assert m.message.role == "assistant" and m.message.content == want.text
    assert m.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_stream_with_usage(client, llm, tok):
    messages = [{"role": "user", "content": "Tell me a story."}]
    ids = chat_ids(tok, messages)
    want = greedy(llm, ids, 7)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens == 7
    # Without include_usage no chunk carries usage.
    plain = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                                stream=True))
    assert all(ch.usage is None for ch in plain) and plain[-1].choices[0].finish_reason == "length"


def test_chat_without_max_tokens_fills_the_context(client, tok):
    # A long prompt leaves ~12 tokens of context, so "fill the context" stays quick.
    k = (CTX - 12) // len(tok(" apple").input_ids)
    while True:
        messages = [{"role": "user", "content": " apple" * k}]
        n_prompt = len(chat_ids(tok, messages))
        if n_prompt <= CTX - 4:
            break
        k -= 1
    assert CTX - 40 < n_prompt <= CTX - 4, n_prompt
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == CTX - n_prompt
    assert r.usage.total_tokens == CTX


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string(client, llm, stream):
    prompt = "The capital of France is"
    full = greedy(llm, prompt, 24).text
    stop = "challenge"
    assert stop in full and full.index(stop) > 0
    want = full[: full.index(stop)]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        text = "".join(ch.choices[0].text for ch in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(**kw)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert r.usage.completion_tokens < 24
    assert text == want and stop not in text
    assert finish == "stop"


def test_models(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["max_model_len"] == CTX
    assert http.get("/health").status_code == 200


def test_concurrent_requests(client):
    def one(i: int):
        return client.completions.create(model=MODEL, prompt=f"Request number {i} says", max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(one, range(16)))
    assert len(results) == 16
    assert len({r.id for r in results}) == 16
    for r in results:
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    # Same prompt twice in one batch: same greedy text.
    with ThreadPoolExecutor(2) as ex:
        a, b = ex.map(lambda _: client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6,
                                                          temperature=0), range(2))
    assert a.choices[0].text == b.choices[0].text


# ---- metrics --------------------------------------------------------------------------------

def test_metrics(client, http):
    before = metrics(http)
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=5, temperature=0, stream=True))
    after = metrics(http)
    for h in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        name = f"pdserve:{h}"
        assert after[f"{name}_count"] >= before.get(f"{name}_count", 0) + 2, h
        assert after[f'{name}_bucket{{le="+Inf"}}'] == after[f"{name}_count"]
        assert after[f"{name}_sum"] > before.get(f"{name}_sum", 0)
    assert after["pdserve:generation_tokens_total"] >= before.get("pdserve:generation_tokens_total", 0) + 10
    assert after['pdserve:request_success_total{finished_reason="length"}'] >= 2
    for g in ("num_requests_running", "num_requests_waiting"):
        assert after[f"pdserve:{g}"] == 0
    assert 0 <= after["pdserve:kv_cache_usage"] <= 1
    assert after["pdserve:kv_total_blocks"] == 512
    assert 0 <= after["pdserve:kv_free_blocks"] <= after["pdserve:kv_total_blocks"]


def wait_idle(http, timeout=10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(http)
        idle = (m["pdserve:num_requests_running"] == 0 and m["pdserve:num_requests_waiting"] == 0
                and m["pdserve:kv_free_blocks"] == m["pdserve:kv_total_blocks"])
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_client_disconnect_mid_stream(server, http, client):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0,
            "stream": True, "ignore_eos": True}
    got = 0
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                got += 1
            if got == 3:  # still generating: the request holds KV blocks right now
                m = metrics(http)
                assert m["pdserve:num_requests_running"] == 1
                assert m["pdserve:kv_free_blocks"] < m["pdserve:kv_total_blocks"]
            if got >= 5:
                break
    # The connection is closed: the server must abort the request and free its blocks.
    m = wait_idle(http)
    assert m["pdserve:num_requests_running"] == 0
    assert m["pdserve:kv_free_blocks"] == m["pdserve:kv_total_blocks"]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


# ---- bad input ------------------------------------------------------------------------------

GOOD = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

# (name, path, body, expected "param"; "?": not pinned)
BAD = [
    ("max_tokens 0", "completions", {**GOOD, "max_tokens": 0}, "max_tokens"),
    ("max_tokens -1", "completions", {**GOOD, "max_tokens": -1}, "max_tokens"),
    ("max_tokens str", "completions", {**GOOD, "max_tokens": "ten"}, "max_tokens"),
    ("temperature 5", "completions", {**GOOD, "temperature": 5}, "temperature"),
    ("top_p 0", "completions", {**GOOD, "top_p": 0}, "top_p"),
    ("prompt 123", "completions", {**GOOD, "prompt": 123}, "prompt"),
    ("stream yes", "completions", {**GOOD, "stream": "yes"}, "stream"),
    ("token id too big", "completions", {**GOOD, "prompt": [1, 10**9]}, "prompt"),
    ("token id negative", "completions", {**GOOD, "prompt": [1, -1]}, "prompt"),
    ("empty prompt", "completions", {**GOOD, "prompt": ""}, "prompt"),
    ("empty token list", "completions", {**GOOD, "prompt": []}, "prompt"),
    ("n 17", "completions", {**GOOD, "n": 17}, "n"),
    ("unknown field", "completions", {**GOOD, "suffix": "x"}, "suffix"),
    ("bad schema", "completions", {**GOOD, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": 5}}}}, "response_format"),
    ("bad regex", "completions", {**GOOD, "guided_regex": "("}, "guided_regex"),
    ("logit_bias outside vocab", "completions", {**GOOD, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ("prompt over context", "completions", {**GOOD, "prompt": [5] * (CTX + 1)}, "?"),
    ("prompt + max_tokens over context", "completions", {**GOOD, "prompt": [5] * (CTX - 8), "max_tokens": 9}, "?"),
    ("max_tokens over context", "chat/completions", {**GOOD_CHAT, "max_tokens": CTX}, "?"),
    ("messages not a list", "chat/completions", {**GOOD_CHAT, "messages": "hi"}, "messages"),
    ("unknown role", "chat/completions", {**GOOD_CHAT, "messages": [{"role": "bot", "content": "x"}]}, "messages"),
    ("chat n 0", "chat/completions", {**GOOD_CHAT, "n": 0}, "n"),
    ("chat tools", "chat/completions", {**GOOD_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),
    ("chat unknown field", "chat/completions", {**GOOD_CHAT, "audio": {"voice": "x"}}, "audio"),
    ("chat temperature 5", "chat/completions", {**GOOD_CHAT, "temperature": 5}, "temperature"),
    ("body is a list", "completions", [GOOD], None),
]


@pytest.mark.parametrize("name,path,body,param", BAD, ids=[b[0] for b in BAD])
def test_bad_request(http, name, path, body, param):
    err = assert_openai_error(http.post(f"/v1/{path}", json=body), 400, param)
    assert err["type"] == "invalid_request_error"
    if "context" in name:
        assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("path,body", [("completions", {**GOOD, "model": "gpt-4"}),
                                       ("chat/completions", {**GOOD_CHAT, "model": "nope"})])
def test_unknown_model_is_404(http, path, body):
    # As OpenAI and vLLM answer: 404 with code model_not_found.
    err = assert_openai_error(http.post(f"/v1/{path}", json=body), 404, "model")
    assert err["type"] == "invalid_request_error" and err["code"] == "model_not_found"


@pytest.mark.parametrize("raw", [b'{"model": "demo",', b"not json", b"", b"\xff\xfe", b'{"model":"demo","prompt":"hi",'
                                 b'"temperature":NaN}'])
def test_malformed_body(http, raw):
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_bad_request_via_openai_client(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    assert ei.value.status_code == 400 and ei.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert ei.value.status_code == 404 and ei.value.body["code"] == "model_not_found"


def test_errors_counted_and_server_still_healthy(http, client):
    before = metrics(http).get('pdserve:request_errors_total{status="400"}', 0)
    for _, path, body, _ in BAD[:5]:
        assert http.post(f"/v1/{path}", json=body).status_code == 400
    after = metrics(http)
    assert after['pdserve:request_errors_total{status="400"}'] >= before + 5
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    r = http.post("/v1/chat/completions", json=GOOD_CHAT)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# ---- partial UTF-8 at the end --------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_partial_utf8_tail_matches_offline(client, llm, stream):
    # `demo`'s greedy continuation of "hi" is byte tokens that never form a character: the text
    # ends in U+FFFD. Streamed or not, the server must return what the offline API returns.
    want = greedy(llm, "hi", 3)
    assert want.text.endswith("\ufffd")
    kw = dict(model=MODEL, prompt="hi", max_tokens=3, temperature=0)
    if stream:
        text = "".join(ch.choices[0].text for ch in client.completions.create(stream=True, **kw))
    else:
        text = client.completions.create(**kw).choices[0].text
    assert text == want.text


# ---- API key --------------------------------------------------------------------------------

def test_api_key(auth_server):
    srv = auth_server
    with httpx.Client(base_url=srv.url, timeout=60) as h:
        assert h.get("/health").status_code == 200  # readiness probes need no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
            r = h.post("/v1/completions", json=GOOD, headers=headers)
            err = assert_openai_error(r, 401)
            assert err["type"] == "authentication_error"
            assert_openai_error(h.post("/v1/chat/completions", json=GOOD_CHAT, headers=headers), 401)
            assert_openai_error(h.get("/v1/models", headers=headers), 401)
        ok = h.post("/v1/completions", json=GOOD, headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    with openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0) as bad_client:
        with pytest.raises(openai.AuthenticationError):
            bad_client.models.list()
    with openai.OpenAI(base_url=srv.url + "/v1", api_key="secret", max_retries=0) as good_client:
        assert [m.id for m in good_client.models.list().data] == [MODEL]
        r = good_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2


def test_server_helper_reports_a_dead_process():
    with pytest.raises(ServerError) as ei, running_server(["serve", "--role", "no-such-role"], timeout=30):
        pass
    msg = str(ei.value)
    assert "exited with code 2" in msg and "no-such-role" in msg  # argparse's exit code and message


def test_stream_error_body_is_json(http):
    # Streaming requests are validated before the stream starts: a bad one is a plain 400, not SSE.
    r = http.post("/v1/completions", json={**GOOD, "stream": True, "max_tokens": 0})
    assert_openai_error(r, 400, "max_tokens")
    assert r.headers["content-type"].startswith("application/json")
    json.loads(r.text)
