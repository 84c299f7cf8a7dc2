"""The per-op path's element-wise ops as native calls (`prefill_ops.c`), for CPU float32 steps the
fused decode layer does not take: prefill chunks, mixed prefill + decode steps, more than 32 tokens.

Between the projections (F.linear, or the small-batch kernel where the step's `native_linear`
says so) and the attention (`paged_attention`, unchanged), each layer makes four native calls:
  1. x += the previous layer's down output; h = input RMSNorm(x) (the first layer: the norm only)
  2. on qkv: [Qwen3's per-head q/k RMSNorm], RoPE on q and k in place, K/V into the paged cache
  3. x += o_proj's output; h = post-attention RMSNorm(x)
  4. act = silu(gate) * up
and the last layer's down output is added in the final norm's call. torch spends ~20 ops a layer
on these (a pass over [T, ...] each, most into a fresh tensor). Their outputs and the projections'
(F.linear's GEMM with out=) live in one buffer reused across layers and steps (a fresh large
tensor is paged in anew); x is the step's embedding output, updated in place, and is what the
forward pass returns (normed).

RoPE, the residual adds and the KV write are bitwise the torch path's; RMSNorm and silu round
differently (layer_ops.h, shared with the fused decode layer; here the sum of squares in 16 lanes
and glibc's vector expf, for speed at hundreds of rows). Built by `native_build.py`;
`cache.prefill_ops` chooses ("auto": native where it builds, on a CPU float32 model).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pdserve.model import native_build
from pdserve.model.attention import AttentionMetadata, paged_attention
from pdserve.model.decode_layer import LAYER_OPS_HEADER, MAX_HEAD_DIM
from pdserve.model.small_linear import project

SOURCE = Path(__file__).with_name("prefill_ops.c")
# No fma contraction and no -ffast-math: RoPE and the residual adds keep torch's roundings.
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-ffp-contract=off")
LINK_FLAGS = ("-shared", "-fopenmp")
PREFILL_OPS_OP = "pdserve::prefill_ops"  # the kernels' name in torch.profiler traces

_p, _i64, _f32, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


@functools.cache
def library() -> ctypes.CDLL | str:
    """The loaded kernels, or why they cannot be had (a string)."""
    so = native_build.build(SOURCE, COMPILE_FLAGS, LINK_FLAGS, includes=(LAYER_OPS_HEADER,))
    if isinstance(so, str):
        return so
    so.add_rmsnorm_f32.argtypes = [_p, _p, _p, _p, _i64, _i64, _f32, _int]
    so.qkv_rope_kv_f32.argtypes = [_p, _i64, _i64, _i64, _i64, _p, _p, _p, _p, _f32, _p, _i64, _p, _int]
    so.silu_mul_f32.argtypes = [_p, _p, _i64, _i64, _int]
    for f in (so.add_rmsnorm_f32, so.qkv_rope_kv_f32, so.silu_mul_f32):
        f.restype = None
    return so


def unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the kernels cannot serve this model (None: they can)."""
    if device.type != "cpu":
        return f"the native prefill ops are for cpu, not {device.type}"
    if dtype != torch.float32:
        return f"the native prefill ops are float32 only, not {dtype}"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} past the kernels' {MAX_HEAD_DIM}"
    lib = library()
    return lib if isinstance(lib, str) else None


def choose(setting: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the per-op path's element-wise ops run natively under `setting` (auto|native|torch)."""
    if setting == "torch":
        return False
    why = unsupported(device, dtype, head_dim)
    if why is not None and setting == "native":
        raise RuntimeError(f"prefill_ops = native, but {why}")
    return why is None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class Kernels:
    """The three kernels on tensors, checked; `threads` is torch's count at the call."""

    def __init__(self) -> None:
        lib = library()
        assert not isinstance(lib, str), lib
        self._lib = lib

    def add_rmsnorm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor,
                    eps: float) -> None:
        """x += delta (when given), then out = RMSNorm(x) over the last dimension; out may be x."""
        t, n = x.shape
        for a in (x, out) if delta is None else (x, out, delta):
            assert a.shape == (t, n) and a.is_contiguous() and a.dtype == torch.float32, "add_rmsnorm: [T, n] f32"
        assert weight.shape == (n,) and weight.is_contiguous() and weight.dtype == torch.float32
        with native_build.label(PREFILL_OPS_OP):
            self._lib.add_rmsnorm_f32(x.data_ptr(), _ptr(delta), weight.data_ptr(), out.data_ptr(), t, n, eps,
                                      torch.get_num_threads())

    def qkv_rope_kv(self, qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor,
                    q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float, cache: torch.Tensor,
                    slots: torch.Tensor) -> None:
        """On qkv [T, (heads + 2 kv) dim]: q/k RMSNorm (when given) and RoPE in place; K, V into `cache`
        ([2, blocks, block_size, kv, dim]) at `slots` ([T] int64, flat block * block_size + offset)."""
        two, nb, bs, kv, dim = cache.shape
        t = qkv.shape[0]
        assert qkv.shape == (t, (heads + 2 * kv) * dim) and qkv.is_contiguous() and qkv.dtype == torch.float32
        assert cache.is_contiguous() and cache.dtype == torch.float32 and two == 2
        assert cos.shape == sin.shape == (t, dim) and cos.is_contiguous() and sin.is_contiguous()
        assert cos.dtype == sin.dtype == torch.float32
        assert slots.shape == (t,) and slots.dtype == torch.int64 and slots.is_contiguous()
        for w in (q_norm, k_norm):
            assert w is None or (w.shape == (dim,) and w.is_contiguous() and w.dtype == torch.float32)
        with native_build.label(PREFILL_OPS_OP):
            self._lib.qkv_rope_kv_f32(qkv.data_ptr(), t, heads, kv, dim, cos.data_ptr(), sin.data_ptr(),
                                      _ptr(q_norm), _ptr(k_norm), eps, cache.data_ptr(), nb * bs,
                                      slots.data_ptr(), torch.get_num_threads())

    def silu_mul(self, gu: torch.Tensor, out: torch.Tensor) -> None:
        """out [T, inter] = silu(gu[:, :inter]) * gu[:, inter:]."""
        t, inter = out.shape
        assert gu.shape == (t, 2 * inter) and gu.is_contiguous() and out.is_contiguous()
        assert gu.dtype == out.dtype == torch.float32
        with native_build.label(PREFILL_OPS_OP):
            self._lib.silu_mul_f32(gu.data_ptr(), out.data_ptr(), t, inter, torch.get_num_threads())


def _linear(layer: nn.Linear, x: torch.Tensor, out: torch.Tensor, native: bool) -> torch.Tensor:
    """`layer(x)`: by the small-batch kernel when `native` (the step's choice), else F.linear's own
    GEMM (addmm / mm, as F.linear calls them for a 2-D input: the same bits) into `out`."""
    if native:
        return project(layer, x, True)
    if layer.bias is None:
        return torch.mm(x, layer.weight.t(), out=out)
    return torch.addmm(layer.bias, x, layer.weight.t(), out=out)


class PrefillOps:
    """The native element-wise ops bound to one model, with its reused buffers (one runner's):
    the normed input h, qkv, the residual branch (o_proj's and down's output), gate_up, act."""

    def __init__(self, model: nn.Module) -> None:
        self.kernels = Kernels()
        s = model.shape  # type: ignore[attr-defined]
        qkv = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
        self._widths = (s.hidden_size, qkv, s.hidden_size, 2 * s.intermediate_size, s.intermediate_size)
        self._rows = 0
        self._buf = torch.empty(0)

    def buffers(self, t: int) -> list[torch.Tensor]:
        """h, qkv, branch, gu, act for t rows: contiguous views of one buffer grown to the largest
        step seen (a fresh large tensor per layer would be paged in anew each time)."""
        if t > self._rows:
            self._buf, self._rows = torch.empty(t * sum(self._widths)), t
        views, at = [], 0
        for w in self._widths:
            views.append(self._buf[at : at + t * w].view(t, w))
            at += t * w
        return views

    def forward(self, backbone: nn.Module, x: torch.Tensor, kv_caches: list[torch.Tensor], meta: AttentionMetadata,
                layer_done: Callable[[int], None] | None = None, keep: torch.Tensor | None = None,
                keep_native: bool = False) -> torch.Tensor:
        """The decoder layers and the final norm on x [T, hidden] (the step's own: updated in place
        and returned). The same as Backbone's layers then its norm, op by op.
        keep: the rows wanted ([K] indices): the last layer, once its K/V are in the cache, goes on
        with these rows only (o_proj, the MLP: ~83% of a layer's FLOPs), and [K, hidden] is returned.
        keep_native: those rows' projections by the small-batch kernel (the runner's choice for K rows:
        its result for a row does not depend on the other rows), else F.linear."""
        assert meta.cos is not None and meta.sin is not None
        assert x.is_contiguous() and x.dtype == torch.float32
        k, t, lin = self.kernels, x.shape[0], meta.native_linear
        h, qkv_buf, branch, gu_buf, act = self.buffers(t)
        cos, sin = meta.cos.contiguous(), meta.sin.contiguous()
        down: torch.Tensor | None = None  # the previous layer's MLP output, not yet added to x
        for i, layer in enumerate(backbone.layers):  # type: ignore[arg-type]
            a, norm = layer.self_attn, layer.input_layernorm
            k.add_rmsnorm(x, down, norm.weight, h, norm.eps)
            qkv = _linear(a.qkv_proj, h, qkv_buf, lin)
            k.qkv_rope_kv(qkv, a.num_heads, cos, sin, a.q_norm.weight if a.qk_norm else None,
                          a.k_norm.weight if a.qk_norm else None, a.q_norm.eps if a.qk_norm else 0.0,
                          kv_caches[i], meta.slot_mapping)
            q_end, k_end = a.q_size, a.q_size + a.kv_size
            o = paged_attention(qkv[:, :q_end].view(t, a.num_heads, a.head_dim),
                                qkv[:, q_end:k_end].view(t, a.num_kv_heads, a.head_dim),
                                qkv[:, k_end:].view(t, a.num_kv_heads, a.head_dim), kv_caches[i], meta, a.scale)
            o = o.reshape(t, -1)
            if keep is not None and i == len(backbone.layers) - 1:  # type: ignore[arg-type]
                x, o, t = x.index_select(0, keep), o.index_select(0, keep), keep.numel()
                h, _, branch, gu_buf, act = self.buffers(t)  # qkv is read: its space is free
                lin = keep_native
            norm = layer.post_attention_layernorm
            k.add_rmsnorm(x, _linear(a.o_proj, o, branch, lin), norm.weight, h, norm.eps)
            gu = _linear(layer.mlp.gate_up_proj, h, gu_buf, lin)
            k.silu_mul(gu, act)
            down = _linear(layer.mlp.down_proj, act, branch, lin)
            if layer_done is not None:
                layer_done(i)
        norm = backbone.norm  # type: ignore[assignment]
        k.add_rmsnorm(x, down, norm.weight, x, norm.eps)
        return x
