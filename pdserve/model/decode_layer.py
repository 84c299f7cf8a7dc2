"""The fused CPU decoder layer (`decode_layer.c`): one native call per layer for a decode step.

A step whose every chunk is one token (T sequences, T <= MAX_ROWS), float32 on a CPU, with the
native decode attention on, runs each layer as one C call: RMSNorm, qkv, RoPE, the KV write,
paged attention, o_proj, residual, RMSNorm, gate_up, silu * up, down, residual, inside one OpenMP
region. The per-op path spends ~20 torch ops (each a few microseconds of dispatch and a fork/join)
per layer on it. Pointers to the weights, caches and scratch are packed once per runner
(`FusedDecode`), the step's once per step (`FusedDecode.start`), so a layer costs one ctypes call.

The projections and attention are the native per-op kernels' own code (bitwise); RMSNorm and silu
round differently from torch's. Batch-invariant: a row's result does not depend on T.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from pdserve.model import native_build, native_decode, small_linear

SOURCE = Path(__file__).with_name("decode_layer.c")
LAYER_OPS_HEADER = Path(__file__).with_name("layer_ops.h")  # RMSNorm, RoPE, silu: shared with prefill_ops.c
# No -ffast-math (small_linear's order of operations is its contract); no fma contraction, so
# RoPE and the residual adds are torch's own roundings.
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-ffp-contract=off")
LINK_FLAGS = ("-shared", "-fopenmp")
MAX_ROWS = small_linear.MAX_ROWS
# Under "auto": every decode step the small-batch kernel serves. Measured faster than the per-op
# path at every batch size (loaded machine, demo model: 0.60-0.63x its time at batch 1, 0.68-0.94x
# at 8-32, bench/results/engine_cpu_layer_*_loaded_r7.json); one arithmetic for every decode step
# also keeps a row's result the same at any batch size.
AUTO_ROWS = range(1, MAX_ROWS + 1)
MAX_HEAD_DIM = 1024  # layer_ops.h's rope buffer (ROPE_MAX_DIM)
DECODE_LAYER_OP = "pdserve::decode_layer"  # its name in torch.profiler traces

_p, _i64, _f32, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


class _Model(ctypes.Structure):
    _fields_ = [(n, _i64) for n in ("hidden", "inter", "heads", "kv_heads", "dim", "num_blocks", "block_size",
                                    "max_rows")] + [("eps", _f32), ("scale", _f32), ("scratch", _p), ("attend", _p)]


class _Layer(ctypes.Structure):
    _fields_ = [(n, _p) for n in ("in_norm", "post_norm", "w_qkv", "b_qkv", "q_norm", "k_norm", "w_o", "w_gu",
                                  "w_down", "cache")]


class _Step(ctypes.Structure):
    _fields_ = [("T", _i64), ("table_width", _i64), ("x", _p), ("slots", _p), ("cos", _p), ("sin", _p),
                ("ctx_lens", _p), ("tables", _p), ("head_split", _int), ("threads", _int), ("phase_s", _p)]


# decode_layer.c's timed phases (`FusedDecode.time_phases`), in order
PHASES = ("norm_qkv_rope_kv_write", "attention", "o_proj", "residual_norm_gate_up_silu", "down", "residual")


@functools.cache
def library() -> ctypes.CDLL | str:
    """The loaded kernel, or why it cannot be had (a string)."""
    so = native_build.build(SOURCE, COMPILE_FLAGS, LINK_FLAGS, includes=(small_linear.SOURCE, native_decode.FTZ_HEADER, LAYER_OPS_HEADER))
    if isinstance(so, str):
        return so
    so.decode_layer_f32.argtypes = [_p, _p, _p]
    so.decode_layer_f32.restype = None
    so.decode_layer_scratch_per_row.argtypes = [_i64] * 6
    so.decode_layer_scratch_per_row.restype = _i64
    return so


def unsupported(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                block_size: int) -> str | None:
    """Why the fused layer cannot serve this model and cache (None: it can)."""
    why = native_decode.unsupported(device, dtype, heads, kv_heads, head_dim, block_size) \
        or small_linear.unsupported(device, dtype)
    if why is not None:
        return why
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} past the fused layer's {MAX_HEAD_DIM}"
    lib = library()
    return lib if isinstance(lib, str) else None


def rows_for(setting: str, native_attention: bool, linear: str, device: torch.device, dtype: torch.dtype,
             heads: int, kv_heads: int, head_dim: int, block_size: int) -> range:
    """The decode step sizes (sequences) that run fused under `setting` ("native": 1 .. MAX_ROWS;
    "torch": none; "auto": `AUTO_ROWS`, none where `linear` (decode_linear) is "torch", which asks
    for F.linear). It needs the native decode attention on."""
    if setting == "torch" or (setting == "auto" and linear == "torch"):
        return range(0)
    why = unsupported(device, dtype, heads, kv_heads, head_dim, block_size)
    if why is None and not native_attention:
        why = "the native decode attention is off (decode_attention)"
    if why is not None and setting == "native":
        raise RuntimeError(f"decode_layer = native, but {why}")
    if why is not None:
        return range(0)
    return AUTO_ROWS if setting == "auto" else range(1, MAX_ROWS + 1)


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    assert t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
    return t.data_ptr()


class FusedDecode:
    """The fused layer bound to one model and its KV caches (their pointers are taken once: the
    runner never replaces a weight or a cache tensor, and `layer` checks the cache)."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], max_rows: int = MAX_ROWS) -> None:
        lib = library()
        assert not isinstance(lib, str), lib
        s = model.shape  # type: ignore[attr-defined]
        _, nb, bs, kv, dim = kv_caches[0].shape
        self.max_rows = max_rows
        self._per_row = functools.partial(lib.decode_layer_scratch_per_row, s.hidden_size, s.intermediate_size,
                                          s.num_heads, kv, dim)
        attend = ctypes.cast(native_decode.library().paged_decode_task_f32, ctypes.c_void_p).value  # type: ignore[union-attr]
        self._model = _Model(s.hidden_size, s.intermediate_size, s.num_heads, kv, dim, nb, bs, max_rows,
                             s.rms_norm_eps, dim**-0.5, None, attend)
        self._threads = 0
        self._scratch = torch.empty(0)
        self._layers = []
        for layer, cache in zip(model.model.layers, kv_caches, strict=True):  # type: ignore[attr-defined]
            a, mlp = layer.self_attn, layer.mlp
            self._layers.append(_Layer(
                _ptr(layer.input_layernorm.weight), _ptr(layer.post_attention_layernorm.weight),
                _ptr(a.qkv_proj.weight), _ptr(a.qkv_proj.bias), _ptr(a.q_norm.weight) if a.qk_norm else None,
                _ptr(a.k_norm.weight) if a.qk_norm else None, _ptr(a.o_proj.weight), _ptr(mlp.gate_up_proj.weight),
                _ptr(mlp.down_proj.weight), _ptr(cache)))
        self._cache_ptrs = [c.data_ptr() for c in kv_caches]
        self._step = _Step()
        self._step_ref = ctypes.addressof(self._step)
        self._model_ref = ctypes.addressof(self._model)
        self._layer_refs = [ctypes.addressof(x) for x in self._layers]
        self._call = lib.decode_layer_f32
        self._keep: tuple[torch.Tensor, ...] = ()
        self._phases: ctypes.Array[ctypes.c_double] | None = None

    def time_phases(self, on: bool) -> None:
        """Accumulate each phase's wall time (seconds, `phase_seconds`) from now on, or stop."""
        self._phases = (ctypes.c_double * len(PHASES))() if on else None
        self._step.phase_s = None if self._phases is None else ctypes.addressof(self._phases)

    def phase_seconds(self) -> dict[str, float]:
        """The phases' wall time since `time_phases(True)`, summed over layers and steps."""
        assert self._phases is not None, "time_phases(True) first"
        return dict(zip(PHASES, self._phases, strict=True))

    def start(self, x: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              d: native_decode.NativeDecode) -> None:
        """Bind this step: x [T, hidden] (updated in place by every layer), the new tokens' cache
        slots [T] int64, RoPE rows [T, head_dim], and every row's context and block table."""
        t = x.shape[0]
        assert 0 < t <= self.max_rows and d.rows.numel() == t and slots.dtype == torch.int64
        assert x.is_contiguous() and x.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
        s, threads = self._step, torch.get_num_threads()
        if threads > self._threads:  # each thread has a private part: sized for the most threads seen
            self._scratch = torch.empty(self.max_rows * self._per_row(threads))  # reused by every layer and step
            self._model.scratch, self._threads = self._scratch.data_ptr(), threads
        s.T, s.table_width, s.threads = t, d.tables.shape[1], threads
        s.head_split = native_decode.head_split(t, threads, self._model.kv_heads)
        s.x, s.slots, s.cos, s.sin = x.data_ptr(), slots.data_ptr(), cos.data_ptr(), sin.data_ptr()
        s.ctx_lens, s.tables = d.ctx_lens.data_ptr(), d.tables.data_ptr()
        self._keep = (x, slots, cos, sin, d.ctx_lens, d.tables)  # alive while the step's layers run

    def layer(self, i: int, cache: torch.Tensor) -> None:
        """Layer i on the bound step (x updated in place); `cache` must be the one bound at init."""
        assert cache.data_ptr() == self._cache_ptrs[i], "FusedDecode: not the KV cache it was built for"
        with native_build.label(DECODE_LAYER_OP):
            self._call(self._model_ref, self._layer_refs[i], self._step_ref)
