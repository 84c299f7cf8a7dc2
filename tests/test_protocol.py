"""Parsing of OpenAI request bodies (pdserve/serve/protocol.py): no server, no model."""

from __future__ import annotations

import json
import math

import pytest

from pdserve.serve.protocol import MAX_JSON_DEPTH, APIError, check_json, parse_chat, parse_completion

CHAT_MSGS = [{"role": "user", "content": "hi"}]


def comp(**kw):
    return parse_completion({"model": "m", "prompt": "hi", **kw})


def chat(**kw):
    return parse_chat({"model": "m", "messages": CHAT_MSGS, **kw})


def bad(fn, body, param):
    with pytest.raises(APIError) as ei:
        fn(body)
    e = ei.value
    assert e.status == 400
    assert e.param == param
    body = e.body()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]
    json.dumps(body)  # serializable as is
    return e


# ---- good requests --------------------------------------------------------------------------

def test_completion_defaults():
    r = comp()
    assert r.model == "m" and r.prompts == ["hi"] and r.messages is None
    assert r.max_tokens == 16 and r.params.max_tokens == 16  # OpenAI's completions default
    assert r.params.temperature == 1.0 and r.params.top_p == 1.0 and r.params.top_k == -1
    assert r.params.stop == [] and r.params.seed is None
    assert not r.stream and not r.include_usage and not r.echo


def test_chat_max_tokens_left_open():
    r = chat()
    assert r.max_tokens is None  # the front fills in what fits in the context
    assert r.messages == CHAT_MSGS and r.prompts is None


@pytest.mark.parametrize("prompt,expected", [
    ("a", ["a"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompt_shapes(prompt, expected):
    assert comp(prompt=prompt).prompts == expected


def test_sampling_fields_pass_through():
    r = comp(max_tokens=7, temperature=0, top_p=0.5, top_k=3, seed=11, stop=["x", "yy"],
             stop_token_ids=[2, 5], ignore_eos=True, min_tokens=2, stream=True,
             stream_options={"include_usage": True}, echo=True)
    p = r.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (7, 0.0, 0.5, 3, 11)
    assert p.stop == ["x", "yy"] and p.stop_token_ids == [2, 5]
    assert p.ignore_eos and p.min_tokens == 2 and p.greedy
    assert r.stream and r.include_usage and r.echo


def test_stop_string_becomes_list_and_nulls_mean_default():
    assert comp(stop="END").params.stop == ["END"]
    r = comp(max_tokens=None, temperature=None, stop=None, stream=None)
    assert r.max_tokens == 16 and r.params.temperature == 1.0 and r.params.stop == [] and not r.stream


def test_max_completion_tokens_alias():
    assert chat(max_completion_tokens=9).max_tokens == 9
    assert chat(max_tokens=4, max_completion_tokens=9).max_tokens == 4


def test_chat_text_parts_joined():
    r = parse_chat({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


def test_range_edges_accepted():
    assert comp(temperature=2).params.temperature == 2.0
    assert comp(top_p=1).params.top_p == 1.0
    assert comp(top_k=1).params.greedy


# ---- bad requests ---------------------------------------------------------------------------

@pytest.mark.parametrize("body", [None, [], "x", 3])
def test_body_not_object(body):
    for fn in (parse_completion, parse_chat):
        bad(fn, body, None)


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", "ten"), ("max_tokens", 1.5), ("max_tokens", True),
    ("max_completion_tokens", 0),
    ("temperature", 5), ("temperature", -0.1), ("temperature", "hot"), ("temperature", math.nan),
    ("temperature", math.inf),
    ("top_p", 0), ("top_p", 1.5), ("top_p", math.nan),
    ("top_k", 0), ("top_k", -2), ("top_k", 2.0),
    ("n", 17), ("n", 0),
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0), ("min_p", 1.5),
    ("logprobs", True), ("logprobs", 21), ("logit_bias", {"x": 1}), ("logit_bias", {"5": 101}),
    ("best_of", 17), ("suffix", "x"), ("prompt_logprobs", 1),
    ("stream", "yes"), ("stream", 1),
    ("stream_options", [1]),
    ("echo", "yes"),
    ("seed", 1.5),
    ("min_tokens", -1),
    ("ignore_eos", "no"),
])
def test_bad_sampling_field(field, value):
    param = "max_tokens" if field == "max_completion_tokens" else field
    e = bad(parse_completion, {"model": "m", "prompt": "hi", field: value}, param)
    assert param in e.message


def test_bad_include_usage_type():
    bad(parse_completion, {"model": "m", "prompt": "hi", "stream": True,
                           "stream_options": {"include_usage": "x"}}, "include_usage")


@pytest.mark.parametrize("stop", [[""], "", [1], ["a"] * 17, 5])
def test_bad_stop(stop):
    bad(parse_completion, {"model": "m", "prompt": "hi", "stop": stop}, "stop")


@pytest.mark.parametrize("ids", [[-1], [1.5], ["a"], [True]])
def test_bad_stop_token_ids(ids):
    bad(parse_completion, {"model": "m", "prompt": "hi", "stop_token_ids": ids}, "stop_token_ids")


@pytest.mark.parametrize("prompt", [123, None, [], [[]], [1, "a"], [True, 1], [["a"]], [[1], "a"], {"a": 1}, 1.5])
def test_bad_prompt(prompt):
    body = {"model": "m"} if prompt is None else {"model": "m", "prompt": prompt}
    bad(parse_completion, body, "prompt")


def test_too_many_prompts():
    assert len(comp(prompt=["a"] * 64).prompts) == 64
    bad(parse_completion, {"model": "m", "prompt": ["a"] * 65}, "prompt")


@pytest.mark.parametrize("fn,extra", [(parse_completion, {"prompt": "hi"}), (parse_chat, {"messages": CHAT_MSGS})])
@pytest.mark.parametrize("model", [None, 5, ["m"]])
def test_bad_model(fn, extra, model):
    body = dict(extra) if model is None else {"model": model, **extra}
    bad(fn, body, "model")


@pytest.mark.parametrize("messages", [
    "hi", [], None, {"role": "user"}, ["hi"], [{"content": "hi"}], [{"role": "wizard", "content": "hi"}],
    [{"role": "user", "content": 5}], [{"role": "user"}], [{"role": 1, "content": "x"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
])
def test_bad_messages(messages):
    body = {"model": "m"} if messages is None else {"model": "m", "messages": messages}
    bad(parse_chat, body, "messages")


def test_error_body_and_headers():
    e = APIError("nope", status=401, type_="authentication_error", code="invalid_api_key",
                 headers={"WWW-Authenticate": "Bearer"})
    assert e.body() == {"error": {"message": "nope", "type": "authentication_error", "param": None,
                                  "code": "invalid_api_key"}}
    assert e.status == 401 and e.headers == {"WWW-Authenticate": "Bearer"} and str(e) == "nope"


# ---- hostile JSON: lone surrogates, depth ----------------------------------------------------

def _nested(depth: int) -> list:
    body: list = []
    for _ in range(depth - 1):
        body = [body]
    return body


@pytest.mark.parametrize("body", [
    {"model": "m", "prompt": "\udcff"},
    {"model": "m", "prompt": ["ok", "a\ud800b"]},
    {"model": "\udfff", "prompt": "hi"},
    {"model": "m", "prompt": "hi", "\udcff": 1},  # in a key
    {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x\udbff"}]}]},
    json.loads('{"model": "m", "prompt": "\\udcff"}'),  # as the JSON decoder makes it from an escape
])
def test_lone_surrogates_refused(body):
    with pytest.raises(APIError) as ei:
        check_json(body)
    assert ei.value.status == 400 and "surrogate" in ei.value.message


def test_valid_unicode_and_pairs_accepted():
    check_json({"model": "m", "prompt": "h\u00e9llo \U0001f600 \u202e", "stop": ["\x00"]})
    check_json(json.loads('{"p": "\\ud83d\\ude00"}'))  # a surrogate *pair* escape is one character


def test_depth_limit_is_exact_and_iterative():
    check_json({"x": _nested(MAX_JSON_DEPTH - 1)})  # MAX_JSON_DEPTH levels in all
    with pytest.raises(APIError, match="nested more than"):
        check_json({"x": _nested(MAX_JSON_DEPTH)})
    with pytest.raises(APIError, match="nested more than"):
        check_json(_nested(100_000))  # no RecursionError however deep


# ---- fields beyond the basics (issue 17) ------------------------------------------------------

def test_penalties_bias_min_p_parse():
    p = comp(presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.3, min_p=0.1,
             logit_bias={"5": -100, "7": 2.5}).params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (0.5, -1.0, 1.3, 0.1)
    assert p.logit_bias == {5: -100.0, 7: 2.5}


def test_logprobs_shapes_and_n():
    assert comp(logprobs=3, n=4).params.logprobs == 3
    assert comp(n=4).n == 4 and comp(best_of=4, n=4).n == 4 and comp(best_of=3).best_of == 3
    bad(parse_completion, {"model": "m", "prompt": "hi", "best_of": 1, "n": 2}, "best_of")
    bad(parse_completion, {"model": "m", "prompt": "hi", "best_of": 3, "stream": True}, "best_of")
    assert chat(logprobs=True, top_logprobs=5).params.logprobs == 5
    assert chat(logprobs=True).params.logprobs == 0
    assert chat().params.logprobs is None
    bad(lambda b: parse_chat(b), {"model": "m", "messages": CHAT_MSGS, "top_logprobs": 2}, "top_logprobs")
    assert comp(logprobs=2, echo=True).params.prompt_logprobs == 2
    assert comp(logprobs=2).params.prompt_logprobs is None
    bad(parse_completion, {"model": "m", "prompt": "hi", "logprobs": 1, "echo": True, "stream": True}, "echo")


@pytest.mark.parametrize("extra,kind", [
    ({"response_format": {"type": "json_object"}}, "json_object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "json_schema"),
    ({"guided_json": {"type": "integer"}}, "json_schema"),
    ({"guided_regex": "[a-z]+"}, "regex"),
    ({"guided_choice": ["yes", "no"]}, "choice"),
    ({"structured_outputs": {"choice": ["a", "b"]}}, "choice"),
    ({"response_format": {"type": "text"}}, None),
])
def test_structured_outputs_parse(extra, kind):
    for fn in (comp, chat):
        g = fn(**extra).params.guided
        assert (g.kind if g else None) == kind


def test_structured_output_refusals():
    bad(parse_chat, {"model": "m", "messages": CHAT_MSGS, "response_format": {"type": "xml"}}, "response_format")
    bad(parse_chat, {"model": "m", "messages": CHAT_MSGS, "guided_choice": []}, "guided_choice")
    bad(parse_chat, {"model": "m", "messages": CHAT_MSGS, "guided_regex": "a", "guided_choice": ["a"]},
        "guided_choice")


@pytest.mark.parametrize("field,value", [("tools", [{"type": "function", "function": {"name": "f"}}]),
                                         ("tool_choice", "required"), ("audio", {}), ("modalities", ["text"]),
                                         ("store", True), ("reasoning_effort", "low")])
def test_chat_refuses_what_it_does_not_implement(field, value):
    e = bad(parse_chat, {"model": "m", "messages": CHAT_MSGS, field: value}, field)
    assert field in e.message


def test_stream_options_and_choice_limits():
    bad(parse_completion, {"model": "m", "prompt": "hi", "stream_options": {"continuous_usage_stats": True}},
        "stream_options")
    bad(parse_completion, {"model": "m", "prompt": ["a"] * 8, "n": 9}, "n")
    assert comp(prompt=["a"] * 8, n=8).n == 8


def test_null_and_inert_fields_pass():
    assert chat(tools=[], tool_choice="none", user="u", audio=None).params.guided is None
    assert comp(user="u", suffix=None).n == 1
