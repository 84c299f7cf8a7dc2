"""The OpenAI fields beyond the basics, through one real disaggregated cluster (1 prefill, 2 decode)
with the official `openai` client: penalties token for token against transformers' processors,
logprobs against its log-softmax, n seeded choices, structured outputs that validate, and a
guided request that survives its decode worker's SIGKILL mid-stream."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from tests import probes
from tests.servers import Server, running_server
from tests.test_sampling_processors import LOGPROB_TOL, PENALTIES, SCHEMA, hf_logprobs, hf_reference, prompts

pytestmark = pytest.mark.slow
SECRET = "openai-fields-secret"
# Many list items: long enough to kill the decode worker mid-stream, still bounded.
LONG_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["items"],
               "properties": {"items": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]},
                                        "minItems": 25, "maxItems": 25}}}


@pytest.fixture(scope="module")
def cluster(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    folder = str(tiny_models["llama"])
    cfg = tmp_path_factory.mktemp("openai-fields") / "cluster.yaml"
    # A decode step slowed by 10 ms: the SIGKILL test must find its stream still being generated.
    # A Reserve answered within 1 s, no waiting for room: a decode worker that builds its grammar
    # compiler (seconds) before answering the first guided Reserve makes that request a 503.
    cfg.write_text("router: {first_token_timeout_s: 10, token_timeout_s: 10, reserve_timeout_s: 1, reserve_wait_s: 0}\n"
                   "fault_decode_step_delay_ms: 10\n")
    args = ["up", "--config", str(cfg), "--model", folder, "--threads", "1", "--port", "0",
            "--prefill", "1", "--decode", "2"]
    with running_server(args, env={"PDSERVE_CLUSTER_SECRET": SECRET}, port_flag=None,
                        url_pattern=r"serving \S+ at (http://[0-9.:]+)/v1", timeout=240) as up:
        yield up, folder


@pytest.fixture(scope="module")
def client(cluster) -> Iterator[openai.OpenAI]:  # type: ignore[no-untyped-def]
    c = openai.OpenAI(base_url=cluster[0].url + "/v1", api_key="x", max_retries=0, timeout=120)
    yield c
    c.close()


def test_penalties_equal_transformers_through_the_cluster(cluster, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    _, folder = cluster
    ps = prompts(3, 300, seed=7)
    for params in (PENALTIES[0], PENALTIES[3]):
        extra = {k: ({str(t): b for t, b in v.items()} if k == "logit_bias" else v) for k, v in params.items()}
        got = []
        for p in ps:
            r = client.completions.create(model=folder, prompt=p, max_tokens=16, temperature=0,
                                          extra_body={"return_token_ids": True, **extra})
            got.append(r.choices[0].model_extra["token_ids"])
        assert got == hf_reference(folder, ps, params), params


def test_logprobs_equal_transformers(cluster, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    _, folder = cluster
    p = [5, 17, 99, 4, 250, 31]
    r = client.completions.create(model=folder, prompt=p, max_tokens=8, temperature=1.0, seed=4, logprobs=3,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    ids = r.choices[0].model_extra["token_ids"]
    lp = r.choices[0].logprobs
    ref = hf_logprobs(folder, p, ids)
    assert len(lp.token_logprobs) == len(ids) == 8
    for i, tok in enumerate(ids):
        assert abs(lp.token_logprobs[i] - ref[i, tok].item()) < LOGPROB_TOL
        assert len(lp.top_logprobs[i]) == 3
        assert max(lp.top_logprobs[i].values()) == pytest.approx(ref[i].max().item(), abs=LOGPROB_TOL)
    # echo: the prompt's log-probabilities too, computed by the prefill worker.
    r = client.completions.create(model=folder, prompt=p, max_tokens=2, temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    prompt_ref = hf_logprobs(folder, p[:1], p[1:])
    assert len(lp.token_logprobs) == len(p) + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(p)):
        assert abs(lp.token_logprobs[i] - prompt_ref[i - 1, p[i]].item()) < LOGPROB_TOL
    # Chat: the same numbers in chat's shape, streamed.
    chunks = list(client.chat.completions.create(
        model=folder, messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    content = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert len(content) == 6 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == c.top_logprobs[0].logprob and c.token == c.top_logprobs[0].token for c in content)


def test_n4_seeded_equals_four_seeded_single_requests(cluster, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    _, folder = cluster
    kw = {"model": folder, "prompt": [7, 8, 9, 10], "max_tokens": 10, "temperature": 1.0}
    many = client.completions.create(n=4, seed=100, **kw, extra_body={"ignore_eos": True})
    ones = [client.completions.create(seed=100 + j, logprobs=0, **kw, extra_body={"ignore_eos": True}).choices[0]
            for j in range(4)]
    singles = [c.text for c in ones]
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.text for c in many.choices] == singles
    assert len(set(singles)) > 1
    # best_of=4, n=1: the one of those four with the highest cumulative log-probability.
    best = max(range(4), key=lambda j: sum(ones[j].logprobs.token_logprobs))
    r = client.completions.create(n=1, best_of=4, seed=100, **kw, extra_body={"ignore_eos": True})
    assert [c.text for c in r.choices] == [singles[best]] and r.choices[0].logprobs is None


def test_structured_outputs_validate_through_the_cluster(cluster, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    _, folder = cluster
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(5):
        r = client.chat.completions.create(model=folder, messages=[{"role": "user", "content": f"who {seed}"}],
                                           max_tokens=60, temperature=1.0, seed=seed, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.completions.create(model=folder, prompt="pick", max_tokens=20, temperature=1.0, seed=1,
                                  extra_body={"guided_choice": ["left", "right"]})
    assert r.choices[0].text in ("left", "right")
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=folder, messages=[{"role": "user", "content": "x"}], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])


def test_a_guided_request_survives_a_decode_sigkill_mid_stream(cluster, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    up, folder = cluster
    kw = {"model": folder, "prompt": [11, 12, 13], "max_tokens": 400, "temperature": 1.0, "seed": 5,
          "extra_body": {"response_format": {"type": "json_schema", "json_schema": {"name": "l", "schema": LONG_SCHEMA}}}}
    want = client.completions.create(**kw).choices[0].text
    jsonschema.validate(json.loads(want), LONG_SCHEMA)
    stream = client.completions.create(stream=True, **kw)
    text = ""
    for _ in range(3):
        text += next(stream).choices[0].text
    inflight = probes.worker_gauge(up.url, "inflight")
    workers = probes.workers_of(up.output())
    busy = [w for w in workers.values() if w.role == "decode" and inflight.get(w.router_name, 0) > 0]
    assert len(busy) == 1, inflight
    os.kill(busy[0].pid, signal.SIGKILL)
    last = None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            last = chunk
    assert last is not None and last.model_extra["timings"].get("retries", 0) >= 1
    assert text == want
    jsonschema.validate(json.loads(text), LONG_SCHEMA)
