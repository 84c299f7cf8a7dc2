"""The CPU small-batch linear kernel (`small_linear.c`): y = x W^T (+ b) for decode-sized batches.

At a few rows MKL's sgemm repacks each weight matrix on every call; this kernel reads W in place
(nn.Linear's own [N, K] weight, no second copy) once per call. Each output element is computed
by one fixed sequence of operations whatever the number of rows or threads, so a row's result is
bitwise the same at any batch size (batch invariance). Built by `native_build.py`.

Where it does not apply (no compiler, not a CPU, not float32, a step of more than `MAX_ROWS`
tokens) the caller keeps `F.linear`; `decode_linear = "native"` makes an unsupported model an
error.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from pdserve.model import native_build

SOURCE = Path(__file__).with_name("small_linear.c")
# No -ffast-math: the kernel's order of operations is its contract (batch invariance).
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC")
LINK_FLAGS = ("-shared", "-fopenmp")
# The kernel serves steps of up to MAX_ROWS tokens; under "auto" only AUTO_ROWS, where it beat
# F.linear on the demo model's shapes, 1 thread, loaded machine (bench/engine_kernels.py,
# engine_cpu_linear_loaded_r7*.json, CPU time): 0.34-0.95x its time from 3 to 32 rows (6 x 4 tiles:
# 0.74-0.95x at 32), 0.92-0.93x at 40, 1.09-1.11x at 48; at 2 rows (the 8 x 2 tile, unchanged since
# round 6 measured it faster) 0.95x and 1.12x in two runs; at 1 row 0.89-0.97x MKL's sgemv
# (medians of 11-25 interleaved rounds, faster in 23 of 25), so the batch-1 step runs it too.
# 2 threads on this loaded 2-core machine measured only scheduling waits. Prefill keeps F.linear.
MAX_ROWS = 32
AUTO_ROWS = range(1, MAX_ROWS + 1)


@functools.cache
def library() -> ctypes.CDLL | str:
    """The loaded kernel, or why it cannot be had (a string)."""
    so = native_build.build(SOURCE, COMPILE_FLAGS, LINK_FLAGS)
    if isinstance(so, str):
        return so
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    so.small_linear_f32.argtypes = [p, i64, p, i64, i64, p, p, i64, i64, ctypes.c_int]
    so.small_linear_f32.restype = None
    return so


def unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot serve this model (None: it can)."""
    if device.type != "cpu":
        return f"the native linear kernel is for cpu, not {device.type}"
    if dtype != torch.float32:
        return f"the native linear kernel is float32 only, not {dtype}"
    lib = library()
    return lib if isinstance(lib, str) else None


def rows_for(setting: str, device: torch.device, dtype: torch.dtype) -> range:
    """The step sizes (tokens) whose projections run natively under `setting` ("auto": where the
    kernel measured faster than F.linear, `AUTO_ROWS`; "native": every step up to MAX_ROWS, so
    every decode batch size gets the same, batch-invariant arithmetic; "torch": none)."""
    if setting == "torch":
        return range(0)
    why = unsupported(device, dtype)
    if why is not None and setting == "native":
        raise RuntimeError(f"decode_linear = native, but {why}")
    if why is not None:
        return range(0)
    return range(1, MAX_ROWS + 1) if setting == "native" else AUTO_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b over x's last dimension, by the kernel: float32 on a CPU, x's rows unit-strided,
    weight (and bias) contiguous. Lean on purpose: it runs ~33 times per decode step, and each
    tensor method costs about a microsecond."""
    lib = library()
    assert not isinstance(lib, str), lib
    if x.dim() != 2:
        return linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    n, k = weight.shape
    m = x.shape[0]
    ldx, unit = x.stride()
    if (unit != 1 and k > 1) or x.shape[1] != k or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or not weight.is_contiguous() or x.device.type != "cpu":
        raise ValueError("small_linear: float32 CPU x [M, K] with unit-strided rows, contiguous float32 W [N, K]")
    if bias is not None and (bias.dtype != torch.float32 or bias.numel() != n or not bias.is_contiguous()):
        raise ValueError("small_linear: the bias must be a contiguous float32 [N]")
    y = torch.empty(m, n)
    lib.small_linear_f32(x.data_ptr(), ldx, weight.data_ptr(), n, k, None if bias is None else bias.data_ptr(),
                         y.data_ptr(), n, m, torch.get_num_threads())
    return y


NATIVE_LINEAR_OP = "pdserve::native_linear"  # the kernel's name in torch.profiler traces


def project(layer: torch.nn.Linear, x: torch.Tensor, native: bool) -> torch.Tensor:
    """`layer(x)` for x [T, K]: by the kernel when `native` (the step's choice), else F.linear."""
    if native:
        with native_build.label(NATIVE_LINEAR_OP):
            return linear(x, layer.weight, layer.bias)
    return F.linear(x, layer.weight, layer.bias)
