"""Long prompts are tokenized on a worker thread, not on the front's event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from pdserve.engine.llm import LLM
from pdserve.serve.async_engine import LocalBackend
from pdserve.serve.frontend import TOKENIZE_ON_LOOP_MAX, OpenAIFront
from pdserve.serve.protocol import APIError, parse_chat, parse_completion


class ThreadSpy:
    """The real tokenizer; remembers on which threads it tokenized."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        self.threads: list[int] = []

    def __call__(self, *a: Any, **k: Any) -> Any:
        self.threads.append(threading.get_ident())
        return self._tok(*a, **k)

    def apply_chat_template(self, *a: Any, **k: Any) -> Any:
        self.threads.append(threading.get_ident())
        return self._tok.apply_chat_template(*a, **k)

    def __len__(self) -> int:
        return len(self._tok)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def test_long_prompts_are_tokenized_off_the_loop(tiny_models) -> None:  # type: ignore[no-untyped-def]
    folder = str(tiny_models["llama"])
    llm = LLM(folder, kv_cache_memory_gb=0.05)
    spy = ThreadSpy(llm.tokenizer)
    front = OpenAIFront(LocalBackend(llm.core), spy, folder)  # type: ignore[arg-type]
    long_text = "The KV cache moves between them, block by block. " * (TOKENIZE_ON_LOOP_MAX // 40)
    assert len(long_text) > TOKENIZE_ON_LOOP_MAX

    async def prepare(body: dict[str, Any], chat: bool) -> tuple[list[int] | APIError, bool]:
        """The prompt ids (or the error), and whether the tokenizer ran off the loop's thread."""
        loop_thread = threading.get_ident()
        spy.threads.clear()
        req = parse_chat(body) if chat else parse_completion(body)
        try:
            out: list[int] | APIError = (await front._prepare_off_loop(req))[0].prompt_ids
        except APIError as e:  # errors raised on the thread reach the handler as they are
            out = e
        assert len(spy.threads) == 1
        return out, spy.threads[0] != loop_thread

    short = {"model": folder, "prompt": "hello there", "max_tokens": 4}
    ids, off = asyncio.run(prepare(short, chat=False))
    assert not off and ids == llm.tokenizer("hello there").input_ids
    # Longer than the tiny model's context: tokenized (off the loop), then refused.
    for body, chat in [({"model": folder, "prompt": long_text, "max_tokens": 4}, False),
                       ({"model": folder, "messages": [{"role": "user", "content": long_text}], "max_tokens": 4},
                        True)]:
        err, off = asyncio.run(prepare(body, chat))
        assert off and isinstance(err, APIError) and err.code == "context_length_exceeded"
