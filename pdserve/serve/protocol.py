"""OpenAI request bodies, validated field by field; anything wrong becomes a 400 naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.sampler import SamplingParams


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
    for key in ("presence_penalty", "frequency_penalty"):
        v = _get(body, key, (int, float), 0.0)
        if v != 0:
            raise APIError(f"'{key}' is not supported (only 0)", param=key)
    n = _get(body, "n", (int,), 1)
    if n != 1:
        raise APIError("'n' must be 1 (several choices per prompt are not supported)", param="n")
    if _get(body, "logprobs", (bool, int), None) not in (None, False):
        raise APIError("'logprobs' is not supported", param="logprobs")
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
        min_tokens=min_tokens,
    ), max_tokens


def _common(body: Any, req: GenerateRequest) -> None:
    req.stream = bool(_get(body, "stream", (bool,), False))
    opts = _get(body, "stream_options", (dict,), {}) or {}
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
    params, max_tokens = _sampling(body, 16)
    req = GenerateRequest(model=model, prompts=prompts, params=params, max_tokens=max_tokens)
    req.echo = bool(_get(body, "echo", (bool,), False))
    _common(body, req)
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
    params, max_tokens = _sampling(body, None)
    req = GenerateRequest(model=model, messages=clean, params=params, max_tokens=max_tokens)
    _common(body, req)
    return req
