"""The OpenAI HTTP front: text in, text out. Used by the router and by a standalone worker.

It owns text: tokenization, chat templates, incremental detokenization and stop strings. The
backend (a local engine or the cluster) only sees token ids.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers import PreTrainedTokenizerBase

from pdserve.engine.detokenizer import TextStream
from pdserve.engine.grammar import GrammarCompiler
from pdserve.serve.backend import Backend, BackendError
from pdserve.serve.metrics import ServerMetrics
from pdserve.serve.protocol import (
    MAX_JSON_DEPTH,
    APIError,
    GenerateRequest,
    check_json,
    parse_chat,
    parse_completion,
)
from pdserve.serve.responses import Choice, Shaper, usage

MAX_BODY_BYTES = 4 * 1024 * 1024
# Prompts longer than this (characters, or token ids) are tokenized on a thread: a long prompt
# takes milliseconds of CPU, during which the event loop would stream nobody's tokens.
TOKENIZE_ON_LOOP_MAX = 4096
# An oversized body is still read (and dropped) up to this many times the limit, so the client
# gets its 413: closing a socket with unread bytes makes the kernel reset the connection, and the
# client then sees "connection reset" instead of the answer. Beyond it, the connection is cut.
DRAIN_FACTOR = 16


class OpenAIFront:
    def __init__(self, backend: Backend, tokenizer: PreTrainedTokenizerBase, model_name: str,
                 api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.vocab_size = len(tokenizer)
        self._grammar: GrammarCompiler | None = None  # built on the first guided request, to check it
        self.metrics = ServerMetrics(backend.stats, getattr(backend, "worker_stats", None),
                                     getattr(backend, "link_stats", None), getattr(backend, "worker_metrics", None))
        self.created = int(time.time())
        self.shaper = Shaper(tokenizer, model_name)

    # ---- app --------------------------------------------------------------------------------
    def app(self) -> FastAPI:
        app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
        front = self

        @app.on_event("startup")
        async def _start() -> None:
            await front.backend.start()

        @app.on_event("shutdown")
        async def _stop() -> None:
            await front.backend.stop()

        @app.get("/health")
        async def health() -> Response:
            # 503 when this server cannot serve now (draining; no worker of a needed role), with why.
            check = getattr(front.backend, "health", None)
            ok, body = check() if check is not None else (True, {"status": "ok"})
            return JSONResponse(body, status_code=200 if ok else 503)

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(front.metrics.render(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            front._auth(request)
            return JSONResponse({"object": "list", "data": [
                {"id": front.model_name, "object": "model", "created": front.created, "owned_by": "pdserve",
                 "max_model_len": front.backend.max_model_len}]})

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await front.handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await front.handle(request, chat=True)

        if hasattr(front.backend, "add_worker"):
            @app.post("/admin/workers")
            async def add_worker(request: Request) -> Response:
                try:
                    front._auth(request)
                    body = await front._body(request)
                    if not isinstance(body, dict):
                        raise APIError("body must be {\"role\": ..., \"address\": \"host:port\"}")
                    try:
                        name = await front.backend.add_worker(str(body.get("role")), str(body.get("address")))  # type: ignore[attr-defined]
                    except ValueError as e:
                        raise APIError(str(e)) from None
                except APIError as e:
                    return front._error(e)
                up = dict((n, v["up"]) for n, _, v in front.backend.worker_stats())  # type: ignore[attr-defined]
                return JSONResponse({"worker": name, "up": bool(up.get(name))})
        if hasattr(front.backend, "switch_role"):  # POST /admin/workers/{name}/role (serve/admin_http.py)
            from pdserve.serve.admin_http import add_admin_routes

            add_admin_routes(app, front)

        @app.exception_handler(APIError)
        async def _api_error(request: Request, exc: APIError) -> Response:
            return front._error(exc)

        @app.exception_handler(Exception)
        async def _internal(request: Request, exc: Exception) -> Response:
            # A bug still answers in OpenAI's format (and is logged by the server with its traceback).
            return front._error(APIError("internal server error", status=500, type_="server_error"))

        return app

    def _error(self, exc: APIError) -> Response:
        self.metrics.errors.labels(str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError("invalid or missing API key", status=401, type_="authentication_error",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> Any:
        """The JSON body: at most `max_body_bytes`, nested at most MAX_JSON_DEPTH deep, valid UTF-8."""
        limit = self.max_body_bytes
        too_big = APIError(f"request body larger than {limit} bytes", status=413, code="request_too_large")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit * DRAIN_FACTOR:
            raise too_big  # not worth reading: the client sees the connection cut
        raw = bytearray()
        seen = 0
        async for part in request.stream():
            seen += len(part)
            if seen > limit * DRAIN_FACTOR:
                raise too_big
            if seen <= limit:
                raw += part
        if seen > limit:
            raise too_big
        try:
            body = json.loads(raw)
        except RecursionError:
            raise APIError(f"JSON body nested more than {MAX_JSON_DEPTH} levels deep") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(f"malformed JSON body: {e}") from None
        check_json(body)
        return body

    # ---- requests ---------------------------------------------------------------------------
    async def handle(self, request: Request, chat: bool) -> Response:
        try:
            self._auth(request)
            body = await self._body(request)
            req = parse_chat(body) if chat else parse_completion(body)
            if req.model != self.model_name:  # 404, as OpenAI and vLLM answer
                raise APIError(f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                               status=404, param="model", code="model_not_found")
            choices = await self._prepare_off_loop(req)
        except APIError as e:
            return self._error(e)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if req.stream:
            # Wait for the first event before answering, so that a request refused up front (router at
            # capacity, every decode worker full, a worker rejecting it) gets its real status code and
            # Retry-After header rather than a 200 followed by an error event.
            events = self._events(rid, req, choices)
            try:
                first = await anext(events)
            except APIError as e:
                await events.aclose()
                return self._error(e)
            return StreamingResponse(self._stream(rid, req, choices, chat, events, first),
                                     media_type="text/event-stream")
        try:
            return JSONResponse(await self._complete(rid, req, choices, chat))
        except APIError as e:
            return self._error(e)

    async def _prepare_off_loop(self, req: GenerateRequest) -> list[Choice]:
        """`_prepare`, on a worker thread when the prompt is long."""
        size = sum(len(p) for p in req.prompts or []) + sum(len(str(m.get("content", ""))) for m in req.messages or [])
        if size <= TOKENIZE_ON_LOOP_MAX:
            return self._prepare(req)
        return await asyncio.to_thread(self._prepare, req)

    def _prepare(self, req: GenerateRequest) -> list[Choice]:
        if req.messages is not None:
            try:
                ids = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True)
            except Exception as e:  # a template can reject a conversation (e.g. role order)
                raise APIError(f"chat template rejected the messages: {e}", param="messages") from None
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            prompt_ids = [list(ids)]
        else:
            assert req.prompts is not None
            prompt_ids = [self.tokenizer(p).input_ids if isinstance(p, str) else list(p) for p in req.prompts]
        limit = self.backend.max_model_len
        choices = []
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise APIError("prompt is empty", param="prompt")
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise APIError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
                               param="prompt")
            # Left out (chat): as many as fit in the context and in what one request can hold here.
            room = min(limit, getattr(self.backend, "max_sequence_tokens", limit))
            max_tokens = req.max_tokens if req.max_tokens is not None else max(1, room - len(ids))
            if len(ids) + max(1, max_tokens) > limit:
                raise APIError(
                    f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                    f"and max_tokens asks for {max_tokens} more", param="max_tokens",
                    code="context_length_exceeded")
            params = dataclasses.replace(req.params, max_tokens=max_tokens)
            for j in range(max(req.n, req.best_of)):
                # Choice j of a seeded request draws as a single request with seed + j would.
                pj = params if j == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + j)
                choices.append(Choice(len(choices), ids, TextStream(self.tokenizer, req.params.stop), pj, i))
        req.params = choices[0].params
        bad = next((t for t in req.params.logit_bias if t >= self.vocab_size), None)
        if bad is not None:
            raise APIError(f"logit_bias token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
                           param="logit_bias")
        if req.params.guided is not None:
            self._check_grammar(req)
        if req.best_of > req.n and req.params.logprobs is None:  # ranking needs them; not shown
            for c in choices:
                c.params = dataclasses.replace(c.params, logprobs=0)
                c.hide_logprobs = True
        return choices

    def _check_grammar(self, req: GenerateRequest) -> None:
        """A bad schema or regex is the client's 400 here, before any worker sees it."""
        if self._grammar is None:
            eos = self.tokenizer.eos_token_id
            self._grammar = GrammarCompiler(self.tokenizer, self.vocab_size, [eos if eos is not None else 0])
        try:
            self._grammar.compile(req.params.guided)  # type: ignore[arg-type]
        except ValueError as e:
            raise APIError(str(e), param=req.guided_param) from None

    async def _run(self, rid: str, req: GenerateRequest, choice: Choice,
                   out: asyncio.Queue[tuple[Choice, str | None] | BaseException]) -> None:
        """Generate one choice, pushing text deltas to `out`; a None delta marks the end."""
        sub_id = f"{rid}-{choice.index}"
        start = time.monotonic()
        first = last = None
        n = 0
        gen = self.backend.generate(sub_id, choice.prompt_ids, choice.params)
        try:
            async for ev in gen:
                if ev.error is not None:
                    raise APIError(ev.error, status=500, type_="server_error")
                now = time.monotonic()
                if ev.token_ids:
                    if first is None:
                        first = now
                        self.metrics.ttft.observe(now - start)
                    elif last is not None:
                        self.metrics.itl.observe(now - last)
                    last = now
                    n += len(ev.token_ids)
                    if ev.logprobs:
                        choice.logprobs.extend(ev.logprobs)
                    if ev.prompt_logprobs:
                        choice.prompt_logprobs = ev.prompt_logprobs
                    delta = choice.stream.add(ev.token_ids)
                    if choice.stream.stopped:
                        choice.finish_reason = "stop"
                        await out.put((choice, delta))
                        break
                    if delta or req.return_token_ids:  # ids asked for: a chunk per token event
                        await out.put((choice, delta))
                if ev.finish_reason is not None:
                    choice.finish_reason = "stop" if ev.finish_reason == "stop" else ev.finish_reason
                    choice.timings, choice.cached = ev.timings, ev.num_cached_tokens
                    await out.put((choice, choice.stream.flush()))
                    break
        except BackendError as e:
            if e.status < 500:  # refused for what the request asks (e.g. more than a worker holds)
                await out.put(APIError(str(e), status=e.status))
            else:
                await out.put(APIError(str(e), status=e.status, type_="server_error",
                                       headers={"Retry-After": str(int(e.retry_after or 1))}))
            return
        except APIError as e:
            await out.put(e)
            return
        finally:
            await gen.aclose()
        end = time.monotonic()
        if choice.finish_reason is None:
            choice.finish_reason = "abort"
        self.metrics.e2e.observe(end - start)
        if first is not None and n > 1:
            self.metrics.tpot.observe((end - first) / (n - 1))
        self.metrics.prompt_tokens.inc(len(choice.prompt_ids))
        self.metrics.generation_tokens.inc(len(choice.stream.token_ids))
        self.metrics.requests.labels(choice.finish_reason).inc()
        self.metrics.observe_phases(choice.timings)
        await out.put((choice, None))

    async def _events(self, rid: str, req: GenerateRequest, choices: list[Choice]
                      ) -> AsyncIterator[tuple[Choice, str, bool]]:
        """Merge the choices' deltas; yields (choice, delta, done)."""
        out: asyncio.Queue[tuple[Choice, str | None] | BaseException] = asyncio.Queue()
        tasks = [asyncio.create_task(self._run(rid, req, c, out)) for c in choices]
        live = len(choices)
        try:
            while live:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                choice, delta = item
                live -= delta is None
                yield choice, delta or "", delta is None
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _complete(self, rid: str, req: GenerateRequest, choices: list[Choice], chat: bool) -> dict[str, Any]:
        texts = {id(c): "" for c in choices}  # by choice: best_of re-indexes
        async for choice, delta, _ in self._events(rid, req, choices):
            texts[id(choice)] += delta
        return self.shaper.completion(rid, req, choices, texts, chat, int(time.time()))

    async def _stream(self, rid: str, req: GenerateRequest, choices: list[Choice], chat: bool,
                      events: AsyncIterator[tuple[Choice, str, bool]], first: tuple[Choice, str, bool]
                      ) -> AsyncIterator[bytes]:
        created = int(time.time())

        def chunk(payload: list[dict[str, Any]], **extra: Any) -> bytes:
            return self.shaper.chunk(rid, chat, created, payload, **extra)

        if chat:
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                          "finish_reason": None} for c in choices])
        try:
            async for choice, delta, done in _prepend(first, events):
                payload = self.shaper.delta(req, choice, delta, done, chat)
                if payload is None:
                    continue
                extra = {"timings": choice.timings} if done else {}
                yield chunk([payload], **extra)
        except APIError as e:
            self.metrics.errors.labels(str(e.status)).inc()
            yield b"data: " + json.dumps(e.body()).encode() + b"\n\n"
            return
        if req.include_usage:
            yield chunk([], usage=usage(choices))
        yield b"data: [DONE]\n\n"



async def _prepend(first: tuple[Choice, str, bool], rest: AsyncIterator[tuple[Choice, str, bool]]
                   ) -> AsyncIterator[tuple[Choice, str, bool]]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
