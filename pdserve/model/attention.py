"""Paged attention in plain torch: write new K/V into cache blocks, attend over each sequence's blocks.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]. A step
holds chunks of several sequences packed into one token dimension (no padding for prefill);
single-token decode chunks are gathered and attended together, padded to the longest context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.model.paged_attention_triton import DecodeMetadata, paged_decode


@dataclass
class AttentionMetadata:
    """Where each packed token's K/V goes, and what each chunk attends to."""

    slot_mapping: torch.Tensor  # [T] flat slot (block * block_size + offset) per new token
    prefill_chunks: list[tuple[int, int, int, torch.Tensor]]  # (q_start, q_len, ctx_len, block_table)
    decode_idx: torch.Tensor | None  # [B] token index of each decode sequence in the packed batch
    decode_ctx: torch.Tensor | None  # [B] context length (keys) of each decode sequence
    decode_tables: torch.Tensor | None  # [B, max_blocks] block tables, padded with 0
    block_size: int


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Scatter this step's K and V ([T, kv_heads, head_dim]) into their slots."""
    _, nb, bs, h, d = cache.shape
    cache[0].view(nb * bs, h, d).index_copy_(0, slots, k)
    cache[1].view(nb * bs, h, d).index_copy_(0, slots, v)


def _gather(cache_half: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
    h, d = cache_half.shape[-2:]
    return cache_half[table].reshape(-1, h, d)[:ctx]


def paged_attention(
    q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata | DecodeMetadata, scale: float
) -> torch.Tensor:
    """q: [T, heads, head_dim] -> [T, heads, head_dim], causal within each chunk's context."""
    if isinstance(meta, DecodeMetadata):  # engine-gpu hook: a static-shape decode step (CUDA graphs)
        return paged_decode(q, cache, meta.block_tables, meta.context_lens, scale)
    out = torch.empty_like(q)
    n_heads, n_kv = q.shape[1], cache.shape[3]
    group = n_heads // n_kv
    for q_start, q_len, ctx, table in meta.prefill_chunks:
        k = _gather(cache[0], table, ctx).transpose(0, 1)  # [kv, ctx, d]
        v = _gather(cache[1], table, ctx).transpose(0, 1)
        qq = q[q_start : q_start + q_len].transpose(0, 1)  # [heads, q_len, d]
        # Query i sits at position ctx - q_len + i and sees keys up to and including itself.
        qpos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos
        o = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)
        out[q_start : q_start + q_len] = o.transpose(0, 1)
    if meta.decode_idx is not None:
        assert meta.decode_tables is not None and meta.decode_ctx is not None
        b, max_blocks = meta.decode_tables.shape
        bs = meta.block_size
        d = q.shape[-1]
        k = cache[0][meta.decode_tables].reshape(b, max_blocks * bs, n_kv, d).transpose(1, 2)
        v = cache[1][meta.decode_tables].reshape(b, max_blocks * bs, n_kv, d).transpose(1, 2)
        mask = torch.arange(max_blocks * bs, device=q.device)[None, :] < meta.decode_ctx[:, None]
        qq = q[meta.decode_idx].unsqueeze(2)  # [B, heads, 1, d]
        o = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                           enable_gqa=group > 1)
        out[meta.decode_idx] = o.squeeze(2)
    return out
