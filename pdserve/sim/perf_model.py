"""Step-time models: how long one engine step takes, the simulator's seam for the model runner.

`RooflineModel` predicts from first principles: a step costs the larger of its FLOP time (at an
achievable share of peak) and its byte time (weights + KV read at an achievable share of memory
bandwidth), plus tensor-parallel all-reduces and a fixed per-step overhead (scheduler, launch,
sampling). `ProfiledModel` (profile.py) fits the same interface to measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pdserve.config.model import DTYPE_BYTES, ModelShape
from pdserve.sim.hardware import GPU, get_link


class StepTimeModel(Protocol):
    """Seconds for one step. A prefill chunk is (new_tokens, tokens_already_cached)."""

    def prefill_time(self, token_counts: list[int]) -> float: ...

    def decode_time(self, context_lens: list[int]) -> float: ...

    def mixed_time(self, prefill_chunks: list[tuple[int, int]], decode_contexts: list[int]) -> float: ...


def decode_run_times(model: StepTimeModel, context_lens: list[int], steps: int) -> list[float]:
    """Times of `steps` decode steps in a row, every context one longer each step.

    Equal to calling `decode_time` step by step; models may offer a faster `decode_run_times`.
    """
    fast = getattr(model, "decode_run_times", None)
    if fast is not None:
        return fast(context_lens, steps)  # type: ignore[no-any-return]
    return [model.decode_time([c + j for c in context_lens]) for j in range(steps)]


@dataclass
class RooflineModel:
    """Roofline step time for `shape` on `tp` x `gpu`."""

    shape: ModelShape
    gpu: GPU
    tp: int = 1
    mfu: float = 0.55  # achievable share of peak FLOP/s for large GEMMs (vLLM prefill: ~50-60%)
    mbu: float = 0.80  # achievable share of memory bandwidth for decode (vLLM/TRT-LLM: ~75-85%)
    overhead_s: float = 0.002  # per step: scheduling, kernel launches, sampling, detokenize hand-off
    allreduce_latency_s: float = 8e-6  # per all-reduce (NCCL small-message latency on NVLink)

    def __post_init__(self) -> None:
        s = self.shape
        self._head = s.vocab_size * s.hidden_size
        self._body = s.flops_per_token(0) / 2 - self._head  # matmul params except the LM head
        self._attn = 4 * s.num_layers * s.num_heads * s.head_dim  # FLOPs per (query, key) pair
        self._weights = s.weight_bytes()
        self._kv_tok = s.kv_bytes_per_token()
        self._act = DTYPE_BYTES[s.dtype] * s.hidden_size
        self._link = get_link(self.gpu.tp_link)
        # Constant factors of step_time, grouped exactly as there (same floating-point results).
        self._body2, self._head2 = 2 * self._body, 2 * self._head
        self._flop_rate = self.tp * self.gpu.bf16_flops * self.mfu
        self._byte_rate = self.tp * self.gpu.mem_bw * self.mbu
        self._ar_frac = 2 * (self.tp - 1) / self.tp
        self._ar_ops = 2 * self.shape.num_layers
        self._ar_cache: dict[int, float] = {}  # allreduce_time by token count (decode: batch size)

    # ---- pieces ------------------------------------------------------------------------------
    def step_time(self, tokens: int, sampled: int, pairs: float, kv_read: int) -> float:
        """`tokens` computed, `sampled` logits, `pairs` attention (query, key) pairs, `kv_read` KV tokens read."""
        flops = self._body2 * tokens + self._head2 * sampled + self._attn * pairs
        t_flop = flops / self._flop_rate
        byts = self._weights + self._kv_tok * (kv_read + tokens)  # read weights + KV, write new KV
        t_mem = byts / self._byte_rate
        t = t_flop if t_flop > t_mem else t_mem
        ar = self._ar_cache.get(tokens)
        if ar is None:
            ar = self._ar_cache[tokens] = self.allreduce_time(tokens)
        return t + ar + self.overhead_s

    def allreduce_time(self, tokens: int) -> float:
        """Two ring all-reduces per layer (after attention and after the MLP) of the activations."""
        if self.tp == 1:
            return 0.0
        size = tokens * self._act
        per_op = self._ar_frac * size / self._link.effective_bandwidth
        return self._ar_ops * (per_op + self.allreduce_latency_s)

    # ---- StepTimeModel -----------------------------------------------------------------------
    def prefill_time(self, token_counts: list[int]) -> float:
        return self.mixed_time([(n, 0) for n in token_counts], [])

    def decode_time(self, context_lens: list[int]) -> float:
        # mixed_time([], context_lens) without the empty prefill loop (the simulator's hottest call).
        tokens = len(context_lens)
        if tokens == 0:
            return 0.0
        kv_read = sum(context_lens)
        return self.step_time(tokens, tokens, float(kv_read) + tokens, kv_read)

    def decode_run_times(self, context_lens: list[int], steps: int) -> list[float]:
        """decode_time for `steps` steps in a row (contexts + j), with the same arithmetic."""
        tokens = len(context_lens)
        if tokens == 0:
            return [0.0] * steps
        kv = sum(context_lens)
        # step_time(tokens, tokens, float(kv_j) + tokens, kv_j) unrolled: same operations, same order.
        ar = self._ar_cache.get(tokens)
        if ar is None:
            ar = self._ar_cache[tokens] = self.allreduce_time(tokens)
        base = self._body2 * tokens + self._head2 * tokens
        attn, flop_rate, byte_rate = self._attn, self._flop_rate, self._byte_rate
        weights, kv_tok, overhead = self._weights, self._kv_tok, self.overhead_s
        if steps <= 32:  # below this a plain loop beats numpy's per-call cost
            out: list[float] = []
            for j in range(steps):
                kv_j = kv + j * tokens
                t_flop = (base + attn * (float(kv_j) + tokens)) / flop_rate
                t_mem = (weights + kv_tok * (kv_j + tokens)) / byte_rate
                out.append(((t_flop if t_flop > t_mem else t_mem) + ar) + overhead)
            return out
        # numpy applies the same IEEE operations elementwise, so the results are bit-identical.
        kv_a = np.arange(steps, dtype=np.int64) * tokens + kv
        t_flop_a = (base + attn * (kv_a.astype(np.float64) + tokens)) / flop_rate
        t_mem_a = (weights + kv_tok * (kv_a + tokens)) / byte_rate
        return ((np.maximum(t_flop_a, t_mem_a) + ar) + overhead).tolist()  # type: ignore[no-any-return]

    def mixed_time(self, prefill_chunks: list[tuple[int, int]], decode_contexts: list[int]) -> float:
        tokens = len(decode_contexts)
        pairs = float(sum(decode_contexts)) + tokens
        kv_read = sum(decode_contexts)
        for n, prior in prefill_chunks:
            tokens += n
            pairs += n * prior + n * (n + 1) / 2  # causal: token i attends to prior + i keys
            kv_read += prior
        if tokens == 0:
            return 0.0
        return self.step_time(tokens, len(prefill_chunks) + len(decode_contexts), pairs, kv_read)


def kv_capacity_tokens(
    shape: ModelShape, gpu: GPU, tp: int, mem_utilization: float = 0.9, reserve_frac: float = 0.05
) -> int:
    """Tokens of KV that fit beside the weights on `tp` GPUs (vLLM's gpu_memory_utilization idea).

    `reserve_frac` of memory is kept for activations and CUDA graphs. <= 0 means the model does not fit.
    """
    free = tp * gpu.mem_bytes * (mem_utilization - reserve_frac) - shape.weight_bytes()
    return int(free // shape.kv_bytes_per_token())


def min_tp(shape: ModelShape, gpu: GPU, min_kv_tokens: int = 16384) -> int | None:
    """The smallest power-of-two TP degree that holds the weights and `min_kv_tokens` of KV."""
    tp = 1
    while tp <= gpu.max_tp:
        if kv_capacity_tokens(shape, gpu, tp) >= min_kv_tokens:
            return tp
        tp *= 2
    return None
