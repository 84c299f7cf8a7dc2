"""Runs the model on a scheduler's output: packs chunks, builds paged-attention metadata, owns the KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.config.engine import CacheConfig
from pdserve.engine import cuda_graph
from pdserve.engine.cuda_graph import DecodeGraphs
from pdserve.engine.kv_sizing import kv_blocks_for
from pdserve.model import decode_layer, native_decode, prefill_attention, prefill_ops, small_linear
from pdserve.model.attention import (
    GROUP_SLACK_KEYS,
    AttentionMetadata,
    DecodeGroup,
    PrefillChunk,
    group_decodes,
)
from pdserve.model.loader import TORCH_DTYPES, load_model
from pdserve.model.native_decode import NativeDecode
from pdserve.model.prefill_attention import NativePrefill
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
        self.graphs: DecodeGraphs | None = None
        self.num_blocks = kv_blocks_for(self, cache)  # engine-gpu hook: set, or sized from free memory on cuda
        s = self.shape
        self.prompt_logits: list[tuple[Request, int, torch.Tensor]] = []  # openai: see execute
        self.kv_caches = [
            torch.zeros(2, self.num_blocks, cache.block_size, s.num_kv_heads, s.head_dim,
                        dtype=self.dtype, device=self.device)
            for _ in range(s.num_layers)
        ]
        # Attention's gather buffer, kept across steps: large fresh tensors are paged in anew.
        self._workspace: list[torch.Tensor] = []
        self.native_decode = native_decode.choose(cache.decode_attention, self.device, self.dtype, s.num_heads,
                                                  s.num_kv_heads, s.head_dim, cache.block_size)
        # Prefill chunks attended by the native kernel (one call per layer) rather than SDPA.
        self.native_prefill = prefill_attention.choose(cache.prefill_attention, self.device, self.dtype,
                                                       s.num_heads, s.num_kv_heads, s.head_dim)
        # Step sizes (tokens) whose projections run by the small-batch kernel: decode-sized steps.
        self.linear_rows = small_linear.rows_for(cache.decode_linear, self.device, self.dtype)
        # Decode step sizes (sequences) whose layers run as one native call each (decode_layer.py).
        self.layer_rows = decode_layer.rows_for(cache.decode_layer, self.native_decode, cache.decode_linear, self.device, self.dtype,
                                                s.num_heads, s.num_kv_heads, s.head_dim, cache.block_size)
        self.fused = decode_layer.FusedDecode(self.model, self.kv_caches) if len(self.layer_rows) else None
        # The element-wise ops of every step that is not fused (prefill, mixed, > 32 tokens) natively.
        self.prefill_ops = prefill_ops.PrefillOps(self.model) if prefill_ops.choose(
            cache.prefill_ops, self.device, self.dtype, s.head_dim) else None
        self.graphs = cuda_graph.attach(self, cache)  # engine-gpu hook: capture decode graphs on cuda

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, layer_done: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Compute every chunk; return float32 logits for the chunks that sample, in chunk order."""
        self.prompt_logits = []  # this step's only (a graph-replayed step has none)
        if self.graphs is not None and layer_done is None:  # engine-gpu hook: replay a decode graph
            logits = self.graphs.run(out)
            if logits is not None:
                return logits
        ids: list[int] = []
        pos: list[int] = []
        spans: list[tuple[list[int], int, int]] = []
        sample_rows: list[int] = []
        for chunk in out.chunks:
            req, start, n = chunk.request, chunk.start, chunk.num_tokens
            ids.extend(_token_slice(req.prompt_token_ids, req.output_token_ids, start, n))
            pos.extend(range(start, start + n))
            spans.append((req.block_ids, start, n))
            if chunk.sample:
                sample_rows.append(len(ids) - 1)
        dev = self.device
        meta = step_metadata(spans, self.block_size, dev, self._workspace, native=self.native_decode,
                             native_prefill=self.native_prefill)
        positions = _long(pos, dev)
        cos, sin = self.model.rope.table(positions, max(pos) + 1)
        meta.cos, meta.sin = cos.to(self.dtype), sin.to(self.dtype)
        meta.native_linear = len(ids) in self.linear_rows
        if self.fused is not None and meta.native is not None and not meta.prefill and len(ids) in self.layer_rows:
            meta.fused = self.fused
        # --- openai: prompt log-probabilities (echo + logprobs) need every prompt position's logits ---
        echo: list[tuple[Request, int, int, int]] = []  # request, first position, first row, rows
        q = 0
        for chunk in out.chunks:
            r = chunk.request
            if (getattr(r.payload, "prompt_logprobs", None) is not None and not r.output_token_ids
                    and chunk.start < r.num_prompt_tokens):
                echo.append((r, chunk.start, q, chunk.num_tokens))
            q += chunk.num_tokens
        # --- end openai ---
        ops = self.prefill_ops if meta.fused is None else None
        # Only the sampled rows read the last layer past its K/V (native prefill ops; not when
        # prompt logits need every row).
        keep = _long(sample_rows, dev) if ops is not None and not echo and len(sample_rows) < len(ids) else None
        hidden = self.model(_long(ids, dev), positions, self.kv_caches, meta, layer_done, prefill_ops=ops,
                            keep_rows=keep, keep_native=len(sample_rows) in self.linear_rows)
        for req, start, q, n in echo:  # openai
            self.prompt_logits.append((req, start, self.model.logits(hidden[q: q + n])))
        if len(sample_rows) < hidden.shape[0]:
            hidden = hidden[_long(sample_rows, dev)]
        return self.model.logits(hidden, hidden.shape[0] in self.linear_rows)

    # ---- KV in and out (transfer plane) -------------------------------------------------------
    def read_blocks(self, layer: int, block_ids: list[int]) -> torch.Tensor:
        """K and V of some blocks of one layer, as one contiguous CPU tensor [2, n, bs, kv, hd]."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv_caches[layer].index_select(1, idx).contiguous().cpu()

    def write_blocks(self, layer: int, block_ids: list[int], data: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        self.kv_caches[layer].index_copy_(1, idx, data.to(self.device, self.dtype))


def step_metadata(
    spans: list[tuple[list[int], int, int]], block_size: int, device: torch.device,
    workspace: list[torch.Tensor] | None = None, decode_slack: int = GROUP_SLACK_KEYS, native: bool = False,
    native_prefill: bool = False,
) -> AttentionMetadata:
    """Attention metadata for one step, built once and read by every layer. `spans` holds, per
    chunk in packing order, (the sequence's block table, first position, number of tokens).
    native: decode sequences go to the native kernel (one call per layer), not SDPA groups.
    native_prefill: prefill chunks go to the native prefill kernel (their block tables as one
    int32 tensor; no gather index, no mask)."""
    bs, dev = block_size, device
    meta = AttentionMetadata(slot_mapping=torch.empty(0), block_size=bs,
                             workspace=workspace if workspace is not None else [])
    slots: list[int] = []
    dec_rows: list[int] = []
    dec_ctx: list[int] = []
    dec_tables: list[list[int]] = []
    pre_tables: list[list[int]] = []
    for table, start, n in spans:
        q_start = len(slots)
        slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
        if n == 1:
            dec_rows.append(q_start)
            dec_ctx.append(start + 1)
            dec_tables.append(table[: (start + bs) // bs])
        elif native_prefill:
            meta.prefill.append(PrefillChunk(q_start, n, start + n))
            pre_tables.append(table[: -(-(start + n) // bs)])
        elif start == 0:
            meta.prefill.append(PrefillChunk(q_start, n, n))
        else:
            ctx = start + n
            nblk = -(-ctx // bs)
            # Query i sits at position start + i and sees keys up to and including itself.
            mask = torch.arange(nblk * bs, device=dev)[None, :] <= torch.arange(start, ctx, device=dev)[:, None]
            meta.prefill.append(PrefillChunk(q_start, n, ctx, _long(table[:nblk], dev), mask))
    meta.slot_mapping = _long(slots, dev)
    if pre_tables:
        width = max(len(t) for t in pre_tables)
        meta.native_prefill = NativePrefill(
            torch.tensor([[c.q_start, c.q_len, c.ctx_len] for c in meta.prefill], dtype=torch.int32, device=dev),
            torch.tensor([t + [0] * (width - len(t)) for t in pre_tables], dtype=torch.int32, device=dev))
    if native and dec_rows:
        width = max(len(t) for t in dec_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables], dtype=torch.int32, device=dev)
        meta.native = NativeDecode(_long(dec_rows, dev), torch.tensor(dec_ctx, dtype=torch.int32, device=dev),
                                   tables)
        return meta
    # A sequence whose blocks are consecutive is read in place (one SDPA call of its own, no
    # copy); the others are grouped by length and gathered.
    in_place = [i for i, t in enumerate(dec_tables) if _consecutive(t)]
    rest = [i for i, t in enumerate(dec_tables) if not _consecutive(t)]
    groups = [[i] for i in in_place] + [[rest[j] for j in g] for g in group_decodes([dec_ctx[i] for i in rest],
                                                                                    decode_slack)]
    meta.decode = [_decode_group([dec_rows[i] for i in g], [dec_ctx[i] for i in g],
                                 [dec_tables[i] for i in g], bs, dev) for g in groups]
    return meta


def _decode_group(rows: list[int], ctx: list[int], tables: list[list[int]], bs: int,
                  dev: torch.device) -> DecodeGroup:
    """One SDPA call's worth of single-token sequences: tables padded to the longest."""
    width = max(len(t) for t in tables)
    if len(rows) == 1:
        t = tables[0]
        in_place = _consecutive(t)
        return DecodeGroup(_long(rows, dev), None if in_place else _long(t, dev), width, None,
                           slice(rows[0], rows[0] + 1), ctx=ctx[0], first_block=t[0] if in_place else None)
    blocks = _long([b for t in tables for b in t + [0] * (width - len(t))], dev)
    mask = None
    if any(c != width * bs for c in ctx):
        mask = (torch.arange(width * bs, device=dev)[None, :] < _long(ctx, dev)[:, None])[:, None, None, :]
    consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
    return DecodeGroup(_long(rows, dev), blocks, width, mask,
                       slice(rows[0], rows[0] + len(rows)) if consecutive else None)


def _consecutive(table: list[int]) -> bool:
    return table == list(range(table[0], table[0] + len(table)))


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _token_slice(prompt: list[int], output: list[int], start: int, n: int) -> list[int]:
    """Tokens [start, start + n) of prompt + output, without concatenating the two."""
    p = len(prompt)
    if start + n <= p:
        return prompt[start : start + n]
    if start >= p:
        return output[start - p : start - p + n]
    return prompt[start:] + output[: start + n - p]
