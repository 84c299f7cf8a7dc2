"""Paged decode attention whose metadata lives in device tensors, so a CUDA graph can replay it.

One query token per sequence. Block tables and context lengths are read by the kernel from device
memory: nothing about the batch is known on the host, no shape depends on a context length, and
nothing synchronises. That is what lets `engine/cuda_graph.py` capture a decode step once per
batch-size bucket and replay it for any contexts.

Two implementations with one interface, `paged_decode(q, cache, block_tables, context_lens, scale)`:
- a Triton kernel (split-K "flash decoding": each (sequence, KV head, split) program reads every
  `num_splits`-th block of its sequence with an online softmax, a second kernel merges the splits);
  it serves every query head of a GQA group from one read of the K/V block;
- a plain-torch one (gather the whole table width, mask, SDPA) for CPU, also graph-safe but
  its cost follows the table width rather than the context.
The kernel runs on CUDA, and on CPU tensors under `TRITON_INTERPRET=1` (how the tests check it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# triton is imported on first use of the kernel, not here: a CPU worker never pays for its import.



@dataclass
class DecodeMetadata:
    """A decode-only step with static shapes: one token per row, every tensor on the device.

    Rows past the real batch are padding: their slot is the null slot and their table the null block,
    so they write and read only memory no sequence owns.
    """

    slot_mapping: torch.Tensor  # [B] int64: flat cache slot of each row's new K/V
    block_tables: torch.Tensor  # [B, W] int32: physical block of each logical block; beyond the context unread
    context_lens: torch.Tensor  # [B] int32: keys each row attends to, its own token included
    cos: torch.Tensor | None = None  # [B, head_dim] RoPE rows, filled before the forward (see cuda_graph)
    sin: torch.Tensor | None = None
    native_linear: bool = False  # graphs replay CUDA work: the projections stay F.linear


def paged_decode(
    q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
    impl: str | None = None,
) -> torch.Tensor:
    """q [B, heads, head_dim], cache [2, blocks, block_size, kv_heads, head_dim] -> [B, heads, head_dim].

    impl: "triton" or "torch"; default triton on CUDA, torch otherwise. On CPU tensors the Triton
    kernel runs only under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported).
    """
    if impl is None:
        impl = "triton" if q.is_cuda else "torch"
    if impl == "triton":
        return paged_decode_triton(q, cache, block_tables, context_lens, scale)
    return paged_decode_torch(q, cache, block_tables, context_lens, scale)


def paged_decode_torch(
    q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """The whole table width gathered and masked: graph-safe, exact, cost ~ batch x table width."""
    b, width = block_tables.shape
    _, _, bs, n_kv, d = cache.shape
    tables = block_tables.long()
    k = cache[0][tables].reshape(b, width * bs, n_kv, d).transpose(1, 2)
    v = cache[1][tables].reshape(b, width * bs, n_kv, d).transpose(1, 2)
    mask = torch.arange(width * bs, device=q.device)[None, :] < context_lens[:, None]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                       enable_gqa=q.shape[1] != n_kv)
    return o.squeeze(2)


def num_splits_for(batch: int, num_kv_heads: int, width_blocks: int, num_sms: int = 132) -> int:
    """How many splits of each sequence's blocks: enough programs to fill the device twice, at most 16."""
    want = -(-2 * num_sms // max(1, batch * num_kv_heads))
    return max(1, min(16, want, width_blocks))


def paged_decode_triton(
    q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """The Triton kernel; allocates its split partials (fine inside a graph: the graph's pool holds them)."""
    import triton

    split_kernel, merge_kernel = _kernels()
    b, n_heads, d = q.shape
    _, _, bs, n_kv, _ = cache.shape
    group = n_heads // n_kv
    if num_splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = num_splits_for(b, n_kv, block_tables.shape[1], sms)
    q = q.contiguous()
    # The kernel's loop bounds come from these: one integer type for them (a no-op when already int32).
    context_lens, block_tables = context_lens.to(torch.int32), block_tables.to(torch.int32)
    m = torch.empty(b, n_heads, num_splits, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = torch.empty(b, n_heads, num_splits, d, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    d_pad = max(16, triton.next_power_of_2(d))
    bs_pad = max(16, triton.next_power_of_2(bs))
    # tl.dot needs every dimension >= 16; a GQA group is padded up to 16 rows for it.
    g_pad = max(16, triton.next_power_of_2(group))
    split_kernel[(b, n_kv, num_splits)](
        q, cache, block_tables, context_lens, m, lsum, acc,
        q.stride(0), q.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        block_tables.stride(0), scale, num_splits,
        GROUP=group, G_PAD=g_pad, BS=bs, BS_PAD=bs_pad, D=d, D_PAD=d_pad,
        # fp32 in, fp32 math (no tf32). The interpreter's (CPU) bf16 tl.dot is wrong: it upcasts too.
        IEEE=q.dtype == torch.float32 or not q.is_cuda,
    )
    merge_kernel[(b, n_heads)](m, lsum, acc, out, out.stride(0), out.stride(1), num_splits,
                                S_PAD=triton.next_power_of_2(num_splits), D=d, D_PAD=d_pad)
    return out


@functools.cache
def _kernels():  # type: ignore[no-untyped-def]
    """The two Triton kernels, compiled (or interpreted) on first call."""
    import triton
    import triton.language as tl

    @triton.jit
    def _split_kernel(
        q_ptr, cache_ptr, tables_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr,
        sq_b, sq_h, sc_kv, sc_blk, sc_tok, sc_head, st_b, scale, num_splits,
        GROUP: tl.constexpr, G_PAD: tl.constexpr, BS: tl.constexpr, BS_PAD: tl.constexpr,
        D: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        ctx = tl.load(lens_ptr + b)
        n_blocks = (ctx + BS - 1) // BS
        offs_g = tl.arange(0, G_PAD)
        offs_t = tl.arange(0, BS_PAD)
        offs_d = tl.arange(0, D_PAD)
        g_ok = offs_g < GROUP
        d_ok = offs_d < D
        heads = kvh * GROUP + offs_g
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([G_PAD], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
        # Blocks s, s + S, s + 2S, ...: every split gets a share of any context, however short.
        for j in range(s, n_blocks, num_splits):
            blk = tl.load(tables_ptr + b * st_b + j).to(tl.int64)
            tok = j * BS + offs_t
            t_ok = (offs_t < BS) & (tok < ctx)
            kv_off = blk * sc_blk + offs_t[:, None] * sc_tok + kvh * sc_head + offs_d[None, :]
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(cache_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(cache_ptr + sc_kv + kv_off, mask=kv_mask, other=0.0)
            if IEEE:
                sc = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = tl.where(t_ok[None, :], sc * scale, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            p = tl.where(t_ok[None, :], p, 0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        part = (b * (GROUP * tl.num_programs(1)) + heads) * num_splits + s
        tl.store(m_ptr + part, m_i, mask=g_ok)
        tl.store(l_ptr + part, l_i, mask=g_ok)
        tl.store(acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _merge_kernel(
        m_ptr, l_ptr, acc_ptr, out_ptr, so_b, so_h, num_splits,
        S_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D_PAD)
        s_ok = offs_s < num_splits
        base = (b * tl.num_programs(1) + h) * num_splits
        m = tl.load(m_ptr + base + offs_s, mask=s_ok, other=-1.0e30)
        lsum = tl.load(l_ptr + base + offs_s, mask=s_ok, other=0.0)
        acc = tl.load(acc_ptr + (base + offs_s)[:, None] * D + offs_d[None, :],
                      mask=s_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(lsum > 0, tl.exp(m - m_max), 0.0)
        total = tl.sum(lsum * w, 0)
        o = tl.sum(acc * w[:, None], 0) / tl.maximum(total, 1.0e-30)
        tl.store(out_ptr + b * so_b + h * so_h + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < D)

    return _split_kernel, _merge_kernel
