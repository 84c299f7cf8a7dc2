"""The CPU paged decode-attention kernel (`paged_decode.c`): built on first use, called by pointer.

Built, cached and loaded by `native_build.py` (plain C through ctypes; OpenMP through torch's
own runtime). Where the kernel does not apply (no compiler, not a CPU, not float32, shapes past
its limits) the caller keeps the torch path; `decode_attention = "native"` makes that an error
instead.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.model import native_build

SOURCE = Path(__file__).with_name("paged_decode.c")
FTZ_HEADER = Path(__file__).with_name("ftz.h")  # included by both native attention users
# Compiled with -ffast-math (with it glibc's math.h lets gcc vectorise expf, a quarter of the
# batch-16 kernel's time) but linked without it: linked with it, gcc adds crtfastmath.o, whose
# constructor sets flush-to-zero and denormals-are-zero for the whole process as the library
# loads (torch, numpy and Python floats lose subnormals). The kernel sets them itself, per call.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
LINK_FLAGS = ("-shared", "-fopenmp")
MAX_ROW, MAX_HEADS, MAX_BLOCK = 8192, 64, 128  # as paged_decode.c's arrays


@dataclass
class NativeDecode:
    """Every decode sequence of a step, for one kernel call per layer."""

    rows: torch.Tensor  # [B] int64: each sequence's token index in the packed batch
    ctx_lens: torch.Tensor  # [B] int32: keys each attends to, its own included
    tables: torch.Tensor  # [B, W] int32, contiguous: block ids, padded past each context (unread)


@functools.cache
def library() -> ctypes.CDLL | str:
    """The loaded kernel, or why it cannot be had (a string). Built once per source/CPU/compiler."""
    so = native_build.build(SOURCE, COMPILE_FLAGS, LINK_FLAGS, includes=(FTZ_HEADER,))
    if isinstance(so, str):
        return so
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    so.paged_decode_f32.argtypes = [p, i64, p, i64, p, i64, i32, i32, i32, i32, p, p, p, i32, i32, f32, i32, i32]
    so.paged_decode_f32.restype = None
    return so


def unsupported(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                block_size: int) -> str | None:
    """Why the kernel cannot serve this model and cache (None: it can)."""
    if device.type != "cpu":
        return f"the native kernel is for cpu, not {device.type}"
    if dtype != torch.float32:
        return f"the native kernel is float32 only, not {dtype}"
    if heads * head_dim > MAX_ROW or heads > MAX_HEADS or block_size > MAX_BLOCK:
        return f"past the native kernel's limits (heads x head_dim {MAX_ROW}, heads {MAX_HEADS}, block {MAX_BLOCK})"
    lib = library()
    return lib if isinstance(lib, str) else None


def choose(setting: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
           block_size: int) -> bool:
    """Whether decode attention runs natively under `setting` ("auto", "native" or "torch")."""
    if setting == "torch":
        return False
    why = unsupported(device, dtype, heads, kv_heads, head_dim, block_size)
    if why is not None and setting == "native":
        raise RuntimeError(f"decode_attention = native, but {why}")
    return why is None


def head_split(batch: int, threads: int, kv_heads: int) -> int:
    """KV heads split across tasks: whole token rows per task (1) unless that leaves threads idle
    (see paged_decode.c)."""
    return kv_heads if batch < threads else 1


def check_layout(q: torch.Tensor, out: torch.Tensor, cache: torch.Tensor) -> None:
    """What the native attention kernels read: heads and dims dense inside a row (rows may be
    strided: q is a view of the fused qkv buffer), a contiguous cache, float32 throughout."""
    dim = cache.shape[-1]
    assert q.stride()[1:] == (dim, 1) and out.stride()[1:] == (dim, 1) and cache.is_contiguous()
    assert q.dtype == out.dtype == cache.dtype == torch.float32


def paged_decode(q: torch.Tensor, out: torch.Tensor, cache: torch.Tensor, d: NativeDecode, scale: float) -> None:
    """Write into out[d.rows] the attention of q[d.rows] ([T, heads, dim]) over each row's blocks."""
    lib = library()
    assert not isinstance(lib, str), lib
    _, nb, bs, kv, dim = cache.shape
    heads = q.shape[1]
    check_layout(q, out, cache)
    batch, threads = d.rows.numel(), torch.get_num_threads()
    split = head_split(batch, threads, kv)
    lib.paged_decode_f32(q.data_ptr(), q.stride(0), out.data_ptr(), out.stride(0), cache.data_ptr(), nb, bs,
                         kv, dim, heads // kv, d.rows.data_ptr(), d.ctx_lens.data_ptr(), d.tables.data_ptr(),
                         d.tables.shape[1], batch, scale, split, threads)
