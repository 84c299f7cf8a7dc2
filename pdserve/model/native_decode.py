"""The CPU paged decode-attention kernel (`paged_decode.c`): built on first use, called by pointer.

Why plain C through ctypes, not a torch C++ extension: `torch.utils.cpp_extension` compiles
against torch's headers for about a minute in every fresh clone; this one file builds with the
system compiler in about a second. The shared library is cached under a name that hashes the
source, the flags, the compiler and the CPU (it is built for this CPU: -march=native), and is
written to a temporary file and renamed into place, so processes building it at the same time
(pytest-xdist, several workers) each see either nothing or a whole library.

OpenMP: the library links `libgomp.so.1`, the soname torch's own OpenMP runtime is loaded
under, so the loader reuses torch's runtime and its thread pool (no second pool competing for
the cores).

Where the kernel does not apply (no compiler, not a CPU, not float32, shapes past its limits)
the caller keeps the torch path; `decode_attention = "native"` makes that an error instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("paged_decode.c")
# Compiled with -ffast-math (with it glibc's math.h lets gcc vectorise expf, a quarter of the
# batch-16 kernel's time) but linked without it: linked with it, gcc adds crtfastmath.o, whose
# constructor sets flush-to-zero and denormals-are-zero for the whole process as the library
# loads (torch, numpy and Python floats lose subnormals). The kernel sets them itself, per call.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c")
LINK_FLAGS = ("-shared", "-fopenmp")
MAX_ROW, MAX_HEADS, MAX_BLOCK = 8192, 64, 128  # as paged_decode.c's arrays


@dataclass
class NativeDecode:
    """Every decode sequence of a step, for one kernel call per layer."""

    rows: torch.Tensor  # [B] int64: each sequence's token index in the packed batch
    ctx_lens: torch.Tensor  # [B] int32: keys each attends to, its own included
    tables: torch.Tensor  # [B, W] int32, contiguous: block ids, padded past each context (unread)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pdserve" / "native"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


@functools.cache
def library() -> ctypes.CDLL | str:
    """The loaded kernel, or why it cannot be had (a string). Built once per source/CPU/compiler."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return "no C compiler (cc or gcc) on PATH"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cc} --version failed: {e}"
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *COMPILE_FLAGS, *LINK_FLAGS, version, _cpu_id()]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"paged_decode-{key}.so"
    if not lib.exists():
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=lib.parent, suffix=".so.tmp")
            os.close(fd)
            try:
                obj = tmp[: -len(".so.tmp")] + ".o"
                for cmd in ([cc, *COMPILE_FLAGS, str(SOURCE), "-o", obj], [cc, *LINK_FLAGS, obj, "-o", tmp, "-lm"]):
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                    if r.returncode != 0:
                        return f"{cc} failed: {r.stderr.strip()[-500:]}"
                os.replace(tmp, lib)  # atomic: a concurrent builder's rename wins, same bytes
            finally:
                for f in (tmp, tmp[: -len(".so.tmp")] + ".o"):
                    if os.path.exists(f):
                        os.unlink(f)
        except (OSError, subprocess.SubprocessError) as e:
            return f"building {lib} failed: {e}"
    try:
        so = ctypes.CDLL(str(lib))
    except OSError as e:
        return f"loading {lib} failed: {e}"
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


def paged_decode(q: torch.Tensor, out: torch.Tensor, cache: torch.Tensor, d: NativeDecode, scale: float) -> None:
    """Write into out[d.rows] the attention of q[d.rows] ([T, heads, dim]) over each row's blocks."""
    lib = library()
    assert not isinstance(lib, str), lib
    _, nb, bs, kv, dim = cache.shape
    heads = q.shape[1]
    # The kernel walks heads and dims densely inside a row; rows may be strided (q is a view of qkv).
    assert q.stride()[1:] == (dim, 1) and out.stride()[1:] == (dim, 1) and cache.is_contiguous()
    assert q.dtype == out.dtype == cache.dtype == torch.float32
    batch, threads = d.rows.numel(), torch.get_num_threads()
    # Whole token rows per task unless that leaves threads idle (see paged_decode.c).
    split = kv if batch < threads else 1
    lib.paged_decode_f32(q.data_ptr(), q.stride(0), out.data_ptr(), out.stride(0), cache.data_ptr(), nb, bs,
                         kv, dim, heads // kv, d.rows.data_ptr(), d.ctx_lens.data_ptr(), d.tables.data_ptr(),
                         d.tables.shape[1], batch, scale, split, threads)
