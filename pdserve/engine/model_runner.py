"""Runs the model on a scheduler's output: packs chunks, builds paged-attention metadata, owns the KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.config.engine import CacheConfig
from pdserve.model.attention import AttentionMetadata
from pdserve.model.loader import TORCH_DTYPES, load_model
from pdserve.sched.block_manager import cache_salt
from pdserve.sched.output import SchedulerOutput
from pdserve.sched.request import Request


class ModelRunner:
    """One model replica and its KV cache tensors (one [2, blocks, block_size, kv_heads, head_dim] per layer)."""

    def __init__(
        self, model: str, cache: CacheConfig, device: str = "cpu", dtype: str | None = None, seed: int = 0
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
        self.device = torch.device(device)
        self.model, self.shape = load_model(model, dtype=dtype, device=device, seed=seed)
        self.dtype = TORCH_DTYPES[self.shape.dtype]
        # What besides the tokens decides this replica's KV: the prefix cache's salt. The seed
        # matters for dummy weights; an adapter id joins it when adapters exist.
        self.cache_salt = cache_salt(f"{model}#seed={seed}", self.shape.dtype)
        self.block_size = cache.block_size
        per_block = cache.block_size * self.shape.kv_bytes_per_token()
        self.num_blocks = cache.num_blocks or max(4, int(cache.kv_cache_memory_gb * 2**30 // per_block))
        s = self.shape
        self.prompt_logits: list[tuple[Request, int, torch.Tensor]] = []  # openai: see execute
        self.kv_caches = [
            torch.zeros(2, self.num_blocks, cache.block_size, s.num_kv_heads, s.head_dim,
                        dtype=self.dtype, device=self.device)
            for _ in range(s.num_layers)
        ]

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, layer_done: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Compute every chunk; return float32 logits for the chunks that sample, in chunk order."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        prefill: list[tuple[int, int, int, torch.Tensor]] = []
        dec_idx: list[int] = []
        dec_ctx: list[int] = []
        dec_tables: list[list[int]] = []
        sample_rows: list[int] = []
        bs = self.block_size
        for chunk in out.chunks:
            req, start, n = chunk.request, chunk.start, chunk.num_tokens
            q_start = len(ids)
            ids.extend(req.all_token_ids[start : start + n])
            pos.extend(range(start, start + n))
            table = req.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1:
                dec_idx.append(q_start)
                dec_ctx.append(start + 1)
                dec_tables.append(table[: (start + bs) // bs])
            else:
                t = torch.tensor(table[: -(-(start + n) // bs)], dtype=torch.long, device=self.device)
                prefill.append((q_start, n, start + n, t))
            if chunk.sample:
                sample_rows.append(len(ids) - 1)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            prefill_chunks=prefill,
            decode_idx=torch.tensor(dec_idx, dtype=torch.long, device=dev) if dec_idx else None,
            decode_ctx=torch.tensor(dec_ctx, dtype=torch.long, device=dev) if dec_idx else None,
            decode_tables=_pad_tables(dec_tables, dev) if dec_idx else None,
            block_size=bs,
        )
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            self.kv_caches,
            meta,
            layer_done,
        )
        # --- openai: prompt log-probabilities (echo + logprobs) need every prompt position's logits ---
        self.prompt_logits = []
        q = 0
        for chunk in out.chunks:
            p = chunk.request.payload
            if (getattr(p, "prompt_logprobs", None) is not None and not chunk.request.output_token_ids
                    and chunk.start < chunk.request.num_prompt_tokens):
                self.prompt_logits.append((chunk.request, chunk.start,
                                           self.model.logits(hidden[q: q + chunk.num_tokens])))
            q += chunk.num_tokens
        # --- end openai ---
        return self.model.logits(hidden[sample_rows])

    # ---- KV in and out (transfer plane) -------------------------------------------------------
    def read_blocks(self, layer: int, block_ids: list[int]) -> torch.Tensor:
        """K and V of some blocks of one layer, as one contiguous CPU tensor [2, n, bs, kv, hd]."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv_caches[layer].index_select(1, idx).contiguous().cpu()

    def write_blocks(self, layer: int, block_ids: list[int], data: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        self.kv_caches[layer].index_copy_(1, idx, data.to(self.device, self.dtype))


def _pad_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)
