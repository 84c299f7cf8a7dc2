"""Shaping OpenAI response bodies: choices as they progress, usage, logprobs objects, best_of.

Pure formatting over what the front collected; no I/O. The front (serve/frontend.py) drives it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from transformers import PreTrainedTokenizerBase

from pdserve.engine.detokenizer import TextStream
from pdserve.engine.sampler import SamplingParams, TokenLogprobs
from pdserve.serve.protocol import GenerateRequest


@dataclasses.dataclass
class Choice:
    """One prompt's generation as it progresses."""

    index: int
    prompt_ids: list[int]
    stream: TextStream
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    prompt: int = 0  # which prompt of the request it continues
    finish_reason: str | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    cached: int = 0
    streamed_ids: int = 0  # token ids already sent in stream chunks (return_token_ids)
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    logprobs_sent: int = 0  # streaming: how many went out already
    hide_logprobs: bool = False  # computed for best_of's ranking only
    prompt_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # echo: tokens 2..


def usage(choices: list[Choice]) -> dict[str, int]:
    """OpenAI's usage object; best_of: every generated token counts."""
    p = sum(len(c.prompt_ids) for c in choices)
    g = sum(len(c.stream.token_ids) for c in choices)
    return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached for c in choices)}}  # as OpenAI


def best(choices: list[Choice], n: int) -> list[Choice]:
    """best_of: per prompt, the n choices of highest cumulative log-probability (as vLLM), re-indexed."""
    def score(c: Choice) -> float:
        return sum(lp.logprob for lp in c.logprobs[: len(c.stream.token_ids)])

    kept: list[Choice] = []
    for p in sorted({c.prompt for c in choices}):
        kept += sorted((c for c in choices if c.prompt == p), key=score, reverse=True)[:n]
    for i, c in enumerate(kept):
        c.index = i
    return kept


class Shaper:
    """Builds the response bodies and stream chunks of one model's front."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model_name: str) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name

    def completion(self, rid: str, req: GenerateRequest, choices: list[Choice], texts: dict[int, str],
                   chat: bool, created: int) -> dict[str, Any]:
        """The non-streaming body; `texts` maps id(choice) to its text (best_of re-indexes)."""
        use = usage(choices)
        if req.best_of > req.n:
            choices = best(choices, req.n)
        body: dict[str, Any] = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                                "created": created, "model": self.model_name}
        if chat:
            body["choices"] = [{"index": c.index, "message": {"role": "assistant", "content": texts[id(c)]},
                                "logprobs": self.logprobs(c, chat, len(c.stream.token_ids)),
                                "finish_reason": c.finish_reason} for c in choices]
        else:
            prefix = {c.index: (req.prompts[c.prompt] if req.echo and isinstance(req.prompts[c.prompt], str) else "")  # type: ignore[index]
                      for c in choices}
            body["choices"] = [{"index": c.index, "text": prefix[c.index] + texts[id(c)],
                                "logprobs": self.logprobs(c, chat, len(c.stream.token_ids)),
                                "finish_reason": c.finish_reason} for c in choices]
        if req.return_token_ids:  # extension (as in vLLM): exact ids, for clients that compare tokens
            for c, out in zip(choices, body["choices"], strict=True):
                out["token_ids"] = list(c.stream.token_ids)
        body["usage"] = use
        body["timings"] = [c.timings for c in choices]
        return body

    def chunk(self, rid: str, chat: bool, created: int, payload: list[dict[str, Any]], **extra: Any) -> bytes:
        """One SSE data line."""
        body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": self.model_name, "choices": payload, **extra}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def delta(self, req: GenerateRequest, choice: Choice, delta: str, done: bool, chat: bool
              ) -> dict[str, Any] | None:
        """A stream chunk's choice payload (None when there is nothing to send); advances the
        choice's sent counters."""
        new_ids = choice.stream.token_ids[choice.streamed_ids:] if req.return_token_ids else []
        if not delta and not done and not new_ids:
            return None
        finish = choice.finish_reason if done else None
        upto = len(choice.stream.token_ids) if done else len(choice.logprobs)
        lp = self.logprobs(choice, chat, upto, choice.logprobs_sent)
        choice.logprobs_sent = max(choice.logprobs_sent, upto)
        if chat:
            payload = {"index": choice.index, "delta": {"content": delta} if delta else {},
                       "logprobs": lp, "finish_reason": finish}
        else:
            payload = {"index": choice.index, "text": delta, "logprobs": lp, "finish_reason": finish}
        if req.return_token_ids:  # as vLLM: the ids this chunk carries, so clients time tokens, not text
            payload["token_ids"] = list(new_ids)
            choice.streamed_ids += len(new_ids)
        return payload

    def logprobs(self, c: Choice, chat: bool, upto: int, start: int = 0) -> dict[str, Any] | None:
        """OpenAI's logprobs object for tokens start..upto of a choice (None when not asked for)."""
        if c.params.logprobs is None or c.hide_logprobs:
            return None
        ids = c.stream.token_ids[start:upto]
        lps = c.logprobs[start:upto]
        text = self.token_text
        if chat:
            return {"content": [{"token": text(t), "logprob": lp.logprob, "bytes": list(text(t).encode()),
                                 "top_logprobs": [{"token": text(a), "logprob": v, "bytes": list(text(a).encode())}
                                                  for a, v in lp.top]}
                                for t, lp in zip(ids, lps, strict=False)], "refusal": None}
        strs = [text(t) for t in ids[: len(lps)]]
        values: list[float | None] = [lp.logprob for lp in lps]
        tops: list[dict[str, float] | None] = [{text(a): v for a, v in lp.top} for lp in lps]
        if c.params.prompt_logprobs is not None:  # echo: the prompt's tokens first; the first has none
            strs = [text(t) for t in c.prompt_ids] + strs
            values = [None] + [lp.logprob for lp in c.prompt_logprobs] + values
            tops = [None] + [{text(a): v for a, v in lp.top} for lp in c.prompt_logprobs] + tops
        offset = sum(len(text(t)) for t in c.stream.token_ids[:start])
        offsets = []
        for s in strs:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": strs, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def token_text(self, token_id: int) -> str:
        """A token's text; a token that is part of a character (its decode alone is U+FFFD) is
        named by its vocabulary entry instead, so that distinct tokens keep distinct keys."""
        text = self.tokenizer.decode([token_id])
        return text if "\ufffd" not in text else str(self.tokenizer.convert_ids_to_tokens(token_id))
