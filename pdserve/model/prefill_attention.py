"""The CPU paged prefill-attention kernel (`prefill_attention.c`): every prefill chunk of a step in
one call per layer, K/V read in place through each chunk's block table, causal by position.

Built, cached and loaded by `native_build.py` like the decode kernel. `cache.prefill_attention`:
auto takes it for a float32 CPU model whose shape has the vector path (head_dim 64 or 128, GQA
group 1/2/4/8, AVX-512), where it was measured faster than SDPA; native takes it for any shape
within its limits (others by its portable scalar path) and is an error where it cannot run; torch
keeps SDPA (causal fast path for fresh chunks, gather + mask for continuing ones).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.model import native_build, native_decode
from pdserve.model.native_decode import FTZ_HEADER

SOURCE = Path(__file__).with_name("prefill_attention.c")
# No -ffast-math: the vector path's exponential is its own polynomial (nothing to vectorise for
# it), so the kernel keeps IEEE semantics, and nothing can set FTZ/DAZ process-wide as it loads.
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC")
LINK_FLAGS = ("-shared", "-fopenmp")
MAX_DIM = 256  # as prefill_attention.c's


@dataclass
class NativePrefill:
    """Every prefill chunk of a step, for one kernel call per layer."""

    chunks: torch.Tensor  # [n, 3] int32, contiguous: q_start, q_len, ctx_len of each chunk
    tables: torch.Tensor  # [n, W] int32, contiguous: each chunk's block ids, padded past its context (unread)


@functools.cache
def library() -> ctypes.CDLL | str:
    """The loaded kernel, or why it cannot be had (a string). Built once per source/CPU/compiler."""
    so = native_build.build(SOURCE, COMPILE_FLAGS, LINK_FLAGS, includes=(FTZ_HEADER,))
    if isinstance(so, str):
        return so
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    so.prefill_attention_f32.argtypes = [p, i64, p, i64, p, i64, i32, i32, i32, i32, p, p, i32, i32, f32, i32]
    so.prefill_attention_f32.restype = ctypes.c_int
    so.prefill_attention_vectorised.argtypes = [i32, i32]
    so.prefill_attention_vectorised.restype = ctypes.c_int
    return so


def vectorised(head_dim: int, group: int) -> bool:
    """Whether this shape takes the kernel's vector path on this CPU (else its scalar one)."""
    lib = library()
    return not isinstance(lib, str) and bool(lib.prefill_attention_vectorised(head_dim, group))


def unsupported(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> str | None:
    """Why the kernel cannot serve this model and cache (None: it can)."""
    if device.type != "cpu":
        return f"the native kernel is for cpu, not {device.type}"
    if dtype != torch.float32:
        return f"the native kernel is float32 only, not {dtype}"
    if head_dim > MAX_DIM or heads % kv_heads:
        return f"past the native kernel's limits (head_dim {MAX_DIM}, heads a multiple of kv_heads)"
    lib = library()
    return lib if isinstance(lib, str) else None


def choose(setting: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether prefill attention runs natively under `setting` ("auto", "native" or "torch")."""
    if setting == "torch":
        return False
    why = unsupported(device, dtype, heads, kv_heads, head_dim)
    if why is not None and setting == "native":
        raise RuntimeError(f"prefill_attention = native, but {why}")
    if why is not None:
        return False
    return setting == "native" or vectorised(head_dim, heads // kv_heads)


def prefill_attention(q: torch.Tensor, out: torch.Tensor, cache: torch.Tensor, p: NativePrefill, scale: float) -> None:
    """Write into `out` the attention of every chunk's rows of q ([T, heads, dim]) over its context."""
    lib = library()
    assert not isinstance(lib, str), lib
    _, nb, bs, kv, dim = cache.shape
    heads = q.shape[1]
    native_decode.check_layout(q, out, cache)
    assert p.chunks.is_contiguous() and p.tables.is_contiguous()
    rc = lib.prefill_attention_f32(q.data_ptr(), q.stride(0), out.data_ptr(), out.stride(0), cache.data_ptr(), nb, bs,
                                   kv, dim, heads // kv, p.chunks.data_ptr(), p.tables.data_ptr(), p.tables.shape[1],
                                   p.chunks.shape[0], scale, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("prefill_attention_f32: out of memory")
