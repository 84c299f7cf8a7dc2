"""Paged attention in plain torch: write new K/V into cache blocks, attend over each sequence's blocks.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads, head_dim]. A step
holds chunks of several sequences packed into one token dimension (no padding for prefill).

Everything that depends only on the step (which blocks to read, masks, rows) is built once per
step in `AttentionMetadata` and reused by every layer:
* a prefill chunk that starts at position 0 attends to its own new K/V with the causal fast path
  (no gather, no mask); a later chunk gathers its context's blocks and uses a mask built once;
* decode sequences are grouped by context length (`group_decodes`), each group gathered with one
  `index_select` into a reused buffer and attended in one SDPA call, so the cost follows the sum
  of context lengths (plus a bounded padding per group), not batch x longest context;
* or, for a float32 cache on a CPU, every decode sequence in one call per layer of the native
  kernel (`native_decode.py`), which reads each block in place: no copy at all;
* and likewise every prefill chunk, fresh or continuing, in one call per layer of the native
  prefill kernel (`prefill_attention.py`): causal by position, blocks read in place, no mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pdserve.model import native_build, native_decode, prefill_attention
from pdserve.model.native_decode import NativeDecode
from pdserve.model.paged_attention_triton import DecodeMetadata, paged_decode
from pdserve.model.prefill_attention import NativePrefill

if TYPE_CHECKING:
    from pdserve.model.decode_layer import FusedDecode

# Padding (in keys) a decode sequence may add to a group rather than start its own SDPA call: one
# call costs about as much as attending to this many extra keys on a CPU.
GROUP_SLACK_KEYS = 256
NATIVE_DECODE_OP = "pdserve::native_decode"  # the native kernel's name in torch.profiler traces
NATIVE_PREFILL_OP = "pdserve::native_prefill"


@dataclass
class PrefillChunk:
    """Tokens [q_start, q_start + q_len) of the packed batch: positions ctx_len - q_len .. ctx_len - 1."""

    q_start: int
    q_len: int
    ctx_len: int
    # Context blocks to gather; None: fresh (own K/V, causal), or the native kernel's (native_prefill).
    blocks: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # [q_len, n_blocks * block_size] bool, when blocks is set


@dataclass
class DecodeGroup:
    """Single-token sequences attended together: their blocks padded to one width."""

    rows: torch.Tensor  # [b] token index of each sequence in the packed batch
    blocks: torch.Tensor | None  # [b * width] block ids, row-major, padded with block 0
    width: int  # blocks per sequence
    mask: torch.Tensor | None  # [b, 1, 1, width * block_size] bool; None when every key is valid
    row_slice: slice | None = None  # the same rows when they are consecutive (a view, no index)
    # One sequence: its context length, and its first block when its blocks are consecutive in
    # the cache (then `blocks` is None and K/V are read in place, with no copy).
    ctx: int | None = None
    first_block: int | None = None


@dataclass
class AttentionMetadata:
    """Where each packed token's K/V goes, and what each chunk attends to; built once per step."""

    slot_mapping: torch.Tensor  # [T] flat slot (block * block_size + offset) per new token
    block_size: int
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[DecodeGroup] = field(default_factory=list)
    native: NativeDecode | None = None  # every decode sequence, for the native kernel (then `decode` is empty)
    native_prefill: NativePrefill | None = None  # every prefill chunk, for the native kernel (`prefill` then lists them only)
    native_linear: bool = False  # the projections by the small-batch kernel (small_linear.py), not F.linear
    fused: FusedDecode | None = None  # every layer as one native call (decode_layer.py): an all-decode step
    cos: torch.Tensor | None = None  # [T, head_dim] RoPE table rows for the packed positions
    sin: torch.Tensor | None = None
    # Reused gather buffer (grown as needed), [2, blocks, block_size * kv_heads * head_dim].
    workspace: list[torch.Tensor] = field(default_factory=list)


def group_decodes(ctx_lens: list[int], slack: int = GROUP_SLACK_KEYS) -> list[list[int]]:
    """Indices of `ctx_lens` grouped so that each group pads to its longest context by at most
    `slack` keys per sequence; longest first. Sum-of-lengths cost, with few calls when lengths agree."""
    order = sorted(range(len(ctx_lens)), key=lambda i: -ctx_lens[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and ctx_lens[groups[-1][0]] - ctx_lens[i] <= slack:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Scatter this step's K and V ([T, kv_heads, head_dim]) into their slots."""
    _, nb, bs, h, d = cache.shape
    cache[0].view(nb * bs, h, d).index_copy_(0, slots, k)
    cache[1].view(nb * bs, h, d).index_copy_(0, slots, v)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """K and V of `blocks` ([n]) as [2, n, block_size, kv, d], copied with one `index_select` into
    the step's reused buffer (a fresh large tensor per layer would be paged in each time)."""
    two, nb, bs, h, d = cache.shape
    n = blocks.numel()
    ws = meta.workspace
    if not ws or ws[0].shape[1] < n or ws[0].dtype != cache.dtype or ws[0].device != cache.device:
        ws[:] = [torch.empty(two, max(n, ws[0].shape[1] if ws else 0), bs * h * d,
                             dtype=cache.dtype, device=cache.device)]
    buf = ws[0][:, :n]
    torch.index_select(cache.view(two, nb, bs * h * d), 1, blocks, out=buf)
    return buf.view(two, n, bs, h, d)


def paged_attention(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache: torch.Tensor,
    meta: AttentionMetadata | DecodeMetadata, scale: float,
) -> torch.Tensor:
    """q: [T, heads, d]; k_new, v_new: this step's [T, kv, d] (already in `cache`) -> [T, heads, d]."""
    t, n_heads, d = q.shape
    n_kv = cache.shape[3]
    if isinstance(meta, DecodeMetadata):  # engine-gpu hook: a static-shape decode step (CUDA graphs)
        return paged_decode(q, cache, meta.block_tables, meta.context_lens, scale)
    group = n_heads // n_kv
    out = torch.empty_like(q)
    if meta.native_prefill is not None:
        with native_build.label(NATIVE_PREFILL_OP):
            prefill_attention.prefill_attention(q, out, cache, meta.native_prefill, scale)
    # Inputs are 4-D throughout: with 3-D ones SDPA on a CPU takes its slow "math" path.
    for c in meta.prefill if meta.native_prefill is None else ():
        qq = q[c.q_start : c.q_start + c.q_len].transpose(0, 1)[None]  # [1, heads, q_len, d]
        if c.blocks is None:
            k = k_new[c.q_start : c.q_start + c.q_len].transpose(0, 1)[None]  # [1, kv, q_len, d]
            v = v_new[c.q_start : c.q_start + c.q_len].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qq, k, v, is_causal=True, scale=scale, enable_gqa=group > 1)
        else:
            kv = _gather(cache, c.blocks, meta).flatten(1, 2)  # [2, n*bs, kv, d]
            k, v = kv[0].transpose(0, 1)[None], kv[1].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qq, k, v, attn_mask=c.mask, scale=scale, enable_gqa=group > 1)
        out[c.q_start : c.q_start + c.q_len] = o[0].transpose(0, 1)
    if meta.native is not None:
        with native_build.label(NATIVE_DECODE_OP):
            native_decode.paged_decode(q, out, cache, meta.native, scale)
    for g in meta.decode:
        b = g.rows.numel()
        if g.blocks is None:
            assert g.first_block is not None
            kv = cache[:, g.first_block : g.first_block + g.width].reshape(2, 1, -1, n_kv, d)
        else:
            kv = _gather(cache, g.blocks, meta).view(2, b, g.width * meta.block_size, n_kv, d)
        if g.ctx is not None:
            kv = kv[:, :, : g.ctx]  # one sequence: drop the last block's unused slots, no mask
        k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [b, kv, W, d]
        # A query head group shares one KV head: as g queries of that head, GQA needs no expansion.
        qg = (q[g.row_slice] if g.row_slice is not None else q[g.rows]).view(b, n_kv, group, d)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=g.mask, scale=scale).reshape(b, n_heads, d)
        if g.row_slice is not None:
            out[g.row_slice] = o
        else:
            out[g.rows] = o
    return out


def reference_attention(
    q: torch.Tensor, cache: torch.Tensor, tables: list[list[int]], q_lens: list[int], ctx_lens: list[int],
    block_size: int, scale: float,
) -> torch.Tensor:
    """The naive definition, for tests: each sequence's keys read slot by slot, softmax in float64."""
    outs = []
    n_heads, n_kv = q.shape[1], cache.shape[3]
    start = 0
    for table, ql, ctx in zip(tables, q_lens, ctx_lens, strict=True):
        slots = [table[p // block_size] * block_size + p % block_size for p in range(ctx)]
        flat = cache.flatten(1, 2).double()  # [2, nb*bs, kv, d]
        k = flat[0, slots].repeat_interleave(n_heads // n_kv, dim=1)  # [ctx, heads, d]
        v = flat[1, slots].repeat_interleave(n_heads // n_kv, dim=1)
        qq = q[start : start + ql].double()
        s = torch.einsum("qhd,khd->hqk", qq, k) * scale
        qpos = torch.arange(ctx - ql, ctx)[:, None]
        s = s.masked_fill(~(torch.arange(ctx)[None, :] <= qpos), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
        start += ql
    return torch.cat(outs).to(q.dtype)
