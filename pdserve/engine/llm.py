"""The offline API, named as in vLLM: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from pdserve.config.load import cluster_from_dict
from pdserve.config.schema import CacheConfig, ClusterConfig, ConfigError, SchedulerConfig
from pdserve.engine.core import EngineCore
from pdserve.engine.detokenizer import TextStream
from pdserve.engine.grammar import compiler_factory
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.sampler import BatchSampler, SamplingParams, TokenLogprobs
from pdserve.model.tokenizer import load_tokenizer
from pdserve.sched.admission import admission_error, limits_for
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.colocated import ColocatedScheduler
from pdserve.sched.request import RequestStatus


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] | None = None  # per token, when SamplingParams.logprobs is set


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    finished: bool = True
    prompt_logprobs: list[TokenLogprobs] | None = None  # prompt tokens 2.., when SamplingParams.prompt_logprobs is set


def _config(model: str, settings: dict[str, Any]) -> ClusterConfig:
    """The offline engine's settings: a one-worker cluster's top level, cache and colocated policy."""
    top, cache, colocated = {}, {}, {}
    for key, value in settings.items():
        if key in ("dtype", "device", "seed"):
            top[key] = value
        elif key in CacheConfig.__struct_fields__:
            cache[key] = value
        elif key in SchedulerConfig.__struct_fields__:
            colocated[key] = value
        else:
            raise ConfigError(f"{key}: unknown setting of LLM")
    return cluster_from_dict({"model": model, **top, "cache": cache, "colocated": colocated})


class LLM:
    """A colocated engine in this process: continuous batching, chunked prefill, prefix caching."""

    def __init__(self, model: str = "demo", **settings: Any) -> None:
        """settings: dtype, device, seed, and the keys of the cluster file's `cache` and `colocated`
        sections (block_size, num_blocks, kv_cache_memory_gb, enable_prefix_caching, eviction,
        max_num_batched_tokens, max_num_seqs, enable_chunked_prefill); their defaults are the
        schema's (`pdserve.config.schema`), and an unknown key is refused by name."""
        cfg = _config(model, settings)
        self.runner = ModelRunner(model, cfg.cache, device=cfg.device, dtype=cfg.dtype or None, seed=cfg.seed)
        self.block_manager = BlockManager(self.runner.num_blocks, cfg.cache.block_size,
                                          cfg.cache.enable_prefix_caching, cfg.cache.eviction,
                                          self.runner.cache_salt)
        self.scheduler = ColocatedScheduler(cfg.colocated.policy(), self.block_manager)
        shape = self.runner.shape
        self.core = EngineCore(self.runner, self.scheduler, sampler=BatchSampler(
            compiler_factory(model, shape.vocab_size, list(shape.eos_token_ids))))
        self.tokenizer = load_tokenizer(model)
        self.max_model_len = self.runner.shape.max_model_len
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        # Every prompt is checked before any is queued: a refused one must not leave the others
        # behind in the scheduler (the next call would run them and find no output for them).
        limits = limits_for(self.scheduler, self.max_model_len, self.runner.shape.vocab_size)
        todo: list[tuple[str | None, list[int], SamplingParams]] = []
        for i, (prompt, p) in enumerate(zip(prompts, plist, strict=True)):
            text = prompt if isinstance(prompt, str) else None
            ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)  # type: ignore[arg-type]
            why = admission_error(ids, p.max_tokens, limits)
            if why is not None:
                raise ValueError(f"prompt {i}: {why}")
            if p.guided is not None:
                self.core.sampler.check(p.guided)
            todo.append((text, ids, p))
        outputs: dict[str, RequestOutput] = {}
        streams: dict[str, TextStream] = {}
        order: list[str] = []
        lps: dict[str, list[TokenLogprobs]] = {}
        for text, ids, p in todo:
            rid = str(next(self._ids))
            self.core.add(self.core.make_request(rid, ids, p))
            outputs[rid] = RequestOutput(rid, text, ids)
            streams[rid] = TextStream(self.tokenizer, p.stop)
            order.append(rid)
        bar = tqdm(total=len(order), desc="generate", disable=not use_tqdm)
        done = 0
        while done < len(order):
            step = self.core.step()
            for rid, tok in step.new_tokens.items():
                stream = streams[rid]
                if rid in step.prompt_logprobs:
                    outputs[rid].prompt_logprobs = step.prompt_logprobs[rid]
                if rid in step.logprobs:
                    lps.setdefault(rid, []).append(step.logprobs[rid])
                stream.add([tok])
                if stream.stopped:  # a stop string ends the request here, not the policy
                    req = self.scheduler.finish(rid, RequestStatus.FINISHED_STOPPED, self.core.clock())
                    if req is not None:
                        step.finished.append(req)
            for req in step.finished:
                out = outputs[req.request_id]
                stream = streams[req.request_id]
                stream.flush()
                ids = req.output_token_ids[: len(stream.token_ids)]
                lp = lps.pop(req.request_id, None)
                out.outputs = [CompletionOutput(0, stream.text, ids, req.status.finish_reason,
                                                lp[: len(ids)] if lp is not None else None)]
                out.num_cached_tokens = req.num_cached_tokens
                done += 1
                bar.update(1)
        bar.close()
        return [outputs[r] for r in order]
