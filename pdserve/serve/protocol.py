"""OpenAI request bodies, validated field by field; anything wrong becomes a 400 naming the field.

A field pdserve does not implement is refused by name (400), never ignored: a client that asked
for something and got a plain answer would have been misled. `null` counts as absent. The README
section "HTTP API" lists, per field, what is supported and what is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.grammar import GuidedSpec
from pdserve.engine.sampler import SamplingParams

MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default cap; OpenAI's chat allows 20)

# Fields each endpoint implements; anything else (not null) is a 400 naming it.
_SAMPLING = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n",
             "stream", "stream_options", "stop", "stop_token_ids", "seed", "min_tokens", "ignore_eos",
             "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs",
             "return_token_ids", "response_format", "guided_json", "guided_regex", "guided_choice",
             "guided_grammar", "structured_outputs",
             "user"}  # `user`: an end-user id for the caller's own bookkeeping; it changes no output
COMPLETION_FIELDS = frozenset(_SAMPLING | {"prompt", "echo", "best_of"})
CHAT_FIELDS = frozenset(_SAMPLING | {"messages", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"})


class APIError(Exception):
    """An error returned to the client in OpenAI's format."""

    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# OpenAI bodies nest a few levels (messages > content parts > ...); anything deeper is refused
# before it reaches code that recurses (Python's JSON decoder fails near 1,000 levels).
MAX_JSON_DEPTH = 64


def check_json(body: Any) -> None:
    """Refuse nesting beyond MAX_JSON_DEPTH and strings holding lone UTF-16 surrogates (valid JSON
    escapes such as "\\udcff", but no text: the tokenizer and every UTF-8 encoder reject them).
    Iterative, so that no depth of input can exhaust the stack."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
            continue
        if not isinstance(value, list | dict):
            continue
        if depth > MAX_JSON_DEPTH:
            raise APIError(f"JSON body nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(value, dict):
            for key in value:
                _check_text(key)
            items: Any = value.values()
        else:
            items = value
        stack.extend((v, depth + 1) for v in items if isinstance(v, str | list | dict))


def _check_text(s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(f"the body holds a string that is not valid Unicode ({e.reason} at "
                           f"position {e.start}): lone UTF-16 surrogates are not text") from None


@dataclass
class GenerateRequest:
    """A completion or chat request reduced to what the front needs."""

    model: str
    prompts: list[str | list[int]] | None = None  # completions
    messages: list[dict[str, str]] | None = None  # chat
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None  # None: as many as fit in the context
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    return_token_ids: bool = False
    n: int = 1  # choices per prompt; choice j of a seeded request uses seed + j
    best_of: int = 1  # completions: generate this many per prompt, return the n most likely
    chat_logprobs: bool = False  # chat's shape of logprobs (else completions')
    guided_param: str = "response_format"  # the field the structured-output constraint came from


def _get(body: dict[str, Any], key: str, types: tuple[type, ...], default: Any = None,
         allow_none: bool = True) -> Any:
    if key not in body or (body[key] is None and allow_none):
        return default
    v = body[key]
    # bool is an int in Python; a JSON true is never a valid number here.
    if isinstance(v, bool) and bool not in types:
        raise APIError(f"'{key}' must be of type {'/'.join(t.__name__ for t in types)}", param=key)
    if not isinstance(v, types):
        raise APIError(f"'{key}' must be of type {'/'.join(t.__name__ for t in types)}, got {type(v).__name__}",
                       param=key)
    return v


def _range(key: str, v: float, lo: float, hi: float, lo_open: bool = False) -> None:
    # `not lo <= v <= hi` (rather than `v < lo or v > hi`) also rejects NaN, which Python's json accepts.
    if not lo <= v <= hi or (lo_open and v == lo):
        bracket = "(" if lo_open else "["
        raise APIError(f"'{key}' must be in {bracket}{lo}, {hi}], got {v}", param=key)


def _sampling(body: dict[str, Any], max_tokens_default: int | None) -> tuple[SamplingParams, int | None]:
    max_tokens = _get(body, "max_tokens", (int,), None)
    if max_tokens is None:
        max_tokens = _get(body, "max_completion_tokens", (int,), max_tokens_default)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    temperature = float(_get(body, "temperature", (int, float), 1.0))
    _range("temperature", temperature, 0.0, 2.0)
    top_p = float(_get(body, "top_p", (int, float), 1.0))
    _range("top_p", top_p, 0.0, 1.0, lo_open=True)
    top_k = _get(body, "top_k", (int,), -1)
    if top_k != -1 and top_k < 1:
        raise APIError(f"'top_k' must be -1 (off) or >= 1, got {top_k}", param="top_k")
    penalties = {}
    for key in ("presence_penalty", "frequency_penalty"):
        penalties[key] = float(_get(body, key, (int, float), 0.0))
        _range(key, penalties[key], -2.0, 2.0)
    repetition = float(_get(body, "repetition_penalty", (int, float), 1.0))
    _range("repetition_penalty", repetition, 0.0, 10.0, lo_open=True)
    min_p = float(_get(body, "min_p", (int, float), 0.0))
    _range("min_p", min_p, 0.0, 1.0)
    seed = _get(body, "seed", (int,), None)
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise APIError("'stop' must be a non-empty string or a list of at most 16 of them", param="stop")
    stop_ids = _get(body, "stop_token_ids", (list,), [])
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids):
        raise APIError("'stop_token_ids' must be a list of non-negative integers", param="stop_token_ids")
    min_tokens = _get(body, "min_tokens", (int,), 0)
    if min_tokens < 0:
        raise APIError("'min_tokens' must be >= 0", param="min_tokens")
    # max_tokens left out (chat): the front fills in "what fits in the context" once it knows the prompt.
    return SamplingParams(
        max_tokens=max_tokens or 1, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop=stop, stop_token_ids=stop_ids, ignore_eos=bool(_get(body, "ignore_eos", (bool,), False)),
        min_tokens=min_tokens, min_p=min_p, repetition_penalty=repetition, logit_bias=_logit_bias(body),
        guided=_guided(body), **penalties,
    ), max_tokens


def _logit_bias(body: dict[str, Any]) -> dict[int, float]:
    raw = _get(body, "logit_bias", (dict,), {})
    out: dict[int, float] = {}
    for k, v in raw.items():
        if not (isinstance(k, str) and k.isdigit()) or isinstance(v, bool) or not isinstance(v, int | float):
            raise APIError("'logit_bias' must map token ids (as strings) to numbers", param="logit_bias")
        _range("logit_bias", float(v), -100.0, 100.0)
        out[int(k)] = float(v)
    if len(out) > 1024:
        raise APIError("'logit_bias' holds at most 1024 tokens", param="logit_bias")
    return out


def _guided(body: dict[str, Any]) -> GuidedSpec | None:
    """Structured output from OpenAI's `response_format`, vLLM's `guided_*` or its `structured_outputs`."""
    specs: list[tuple[str, GuidedSpec]] = []
    rf = _get(body, "response_format", (dict,), None)
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            specs.append(("response_format", GuidedSpec("json_object")))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise APIError("'response_format.json_schema.schema' must be an object", param="response_format")
            specs.append(("response_format", GuidedSpec("json_schema", json.dumps(schema))))
        elif kind != "text":
            raise APIError("'response_format.type' must be text, json_object or json_schema", param="response_format")
    gj = _get(body, "guided_json", (dict, str), None)
    if gj is not None:
        specs.append(("guided_json", GuidedSpec("json_schema", gj if isinstance(gj, str) else json.dumps(gj))))
    gr = _get(body, "guided_regex", (str,), None)
    if gr is not None:
        specs.append(("guided_regex", GuidedSpec("regex", gr)))
    gc = _get(body, "guided_choice", (list,), None)
    if gc is not None:
        specs.append(("guided_choice", _choice(gc, "guided_choice")))
    gg = _get(body, "guided_grammar", (str,), None)
    if gg is not None:
        specs.append(("guided_grammar", GuidedSpec("grammar", gg)))
    so = _get(body, "structured_outputs", (dict,), None)
    if so is not None:
        specs.extend(("structured_outputs", s) for s in _structured(so))
    if len(specs) > 1:
        raise APIError(f"at most one structured-output constraint per request, got {[k for k, _ in specs]}",
                       param=specs[1][0])
    return specs[0][1] if specs else None


def _choice(choices: list[Any], param: str) -> GuidedSpec:
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise APIError(f"'{param}' must be a non-empty list of non-empty strings", param=param)
    return GuidedSpec("choice", json.dumps(choices))


def _structured(so: dict[str, Any]) -> list[GuidedSpec]:
    """vLLM's `structured_outputs`: {json | regex | choice | grammar | json_object: true}."""
    out = []
    for key, value in so.items():
        if value is None:
            continue
        if key == "json" and isinstance(value, dict | str):
            out.append(GuidedSpec("json_schema", value if isinstance(value, str) else json.dumps(value)))
        elif key == "regex" and isinstance(value, str):
            out.append(GuidedSpec("regex", value))
        elif key == "choice" and isinstance(value, list):
            out.append(_choice(value, "structured_outputs"))
        elif key == "grammar" and isinstance(value, str):
            out.append(GuidedSpec("grammar", value))
        elif key == "json_object" and value is True:
            out.append(GuidedSpec("json_object"))
        else:
            raise APIError(f"'structured_outputs.{key}' is not supported here (json, regex, choice, grammar "
                           "or json_object, with their JSON types)", param="structured_outputs")
    return out


GUIDED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                 "structured_outputs")


def _guided_param(body: dict[str, Any]) -> str:
    return next((k for k in GUIDED_FIELDS if body.get(k) is not None), "response_format")


def _unknown(body: dict[str, Any], known: frozenset[str]) -> None:
    for key, value in body.items():
        if key not in known and value is not None:
            raise APIError(f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")


def _n(body: dict[str, Any]) -> int:
    n = _get(body, "n", (int,), 1)
    if not 1 <= n <= MAX_N:
        raise APIError(f"'n' must be in [1, {MAX_N}], got {n}", param="n")
    return n


def _common(body: Any, req: GenerateRequest) -> None:
    req.stream = bool(_get(body, "stream", (bool,), False))
    opts = _get(body, "stream_options", (dict,), {}) or {}
    extra = next((k for k, v in opts.items() if k != "include_usage" and v is not None), None)
    if extra is not None:
        raise APIError(f"'stream_options.{extra}' is not supported by this server", param="stream_options",
                       code="unsupported_parameter")
    req.include_usage = bool(_get(opts, "include_usage", (bool,), False))
    req.return_token_ids = bool(_get(body, "return_token_ids", (bool,), False))


def _model(body: Any) -> str:
    """The body must be an object naming the model."""
    if not isinstance(body, dict):
        raise APIError("request body must be a JSON object")
    model = _get(body, "model", (str,), None, allow_none=False)
    if model is None:
        raise APIError("'model' is required", param="model")
    return model


def parse_completion(body: Any) -> GenerateRequest:
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(
        isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt
    ):
        prompts = list(prompt)
    else:
        raise APIError("'prompt' must be a string, a list of strings, or a list of token ids", param="prompt")
    if len(prompts) > 64:
        raise APIError("at most 64 prompts per request", param="prompt")
    _unknown(body, COMPLETION_FIELDS)
    params, max_tokens = _sampling(body, 16)
    req = GenerateRequest(model=model, prompts=prompts, params=params, max_tokens=max_tokens)
    req.echo = bool(_get(body, "echo", (bool,), False))
    req.n = _n(body)
    if req.n * len(prompts) > 64:
        raise APIError("at most 64 choices per request (n times the number of prompts)", param="n")
    best_of = _get(body, "best_of", (int,), None)
    if best_of is not None:
        if not req.n <= best_of <= MAX_N or best_of * len(prompts) > 64:
            raise APIError(f"'best_of' must be in [n, {MAX_N}] (and best_of times the prompts at most 64)",
                           param="best_of")
        if _get(body, "stream", (bool,), False) and best_of > req.n:
            raise APIError("'best_of' greater than n cannot stream", param="best_of")
        req.best_of = best_of
    logprobs = _get(body, "logprobs", (int,), None)
    if logprobs is not None:
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise APIError(f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {logprobs}", param="logprobs")
        req.params.logprobs = logprobs
    req.guided_param = _guided_param(body)
    _common(body, req)
    if req.echo and logprobs is not None:  # the prompt's log-probabilities too, computed by its prefill
        if req.stream:
            raise APIError("'echo' with 'logprobs' is not supported when streaming", param="echo")
        req.params.prompt_logprobs = logprobs
    return req


def parse_chat(body: Any) -> GenerateRequest:
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", param="messages")
    clean: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(f"messages[{i}] must be an object with a 'role'", param="messages")
        if m["role"] not in ("system", "user", "assistant", "developer", "tool"):
            raise APIError(f"messages[{i}].role {m['role']!r} is not a known role", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(f"messages[{i}].content must be a string", param="messages")
        clean.append({"role": m["role"], "content": content})
    _unknown(body, CHAT_FIELDS)
    tools = _get(body, "tools", (list,), None)
    if tools:
        raise APIError("tool calls are not supported by this server: 'tools' must be absent or empty",
                       param="tools", code="unsupported_parameter")
    choice = _get(body, "tool_choice", (str, dict), None)
    if choice not in (None, "none", "auto"):  # with no tools, "auto" can only mean none
        raise APIError("tool calls are not supported by this server: 'tool_choice' must be none",
                       param="tool_choice", code="unsupported_parameter")
    params, max_tokens = _sampling(body, None)
    req = GenerateRequest(model=model, messages=clean, params=params, max_tokens=max_tokens)
    req.n = _n(body)
    req.chat_logprobs = True
    want = _get(body, "logprobs", (bool,), False)
    top = _get(body, "top_logprobs", (int,), None)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise APIError(f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}", param="top_logprobs")
    if top is not None and not want:
        raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if want:
        req.params.logprobs = top or 0
    req.guided_param = _guided_param(body)
    _common(body, req)
    return req
