"""One decoder for the Llama family: Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (per-head q/k norm).

Module names follow Hugging Face except two fused projections: `qkv_proj` holds q_proj, k_proj
and v_proj stacked on the output dimension (biases too), `gate_up_proj` holds gate_proj and
up_proj; the loader maps a checkpoint onto them (`FUSED`) and `hf_state_dict` maps back. One
matmul instead of three (and two) per layer; each output element is the same dot product.
Tokens of all sequences in a step are packed into one dimension; attention reads the paged cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.config.model import ModelShape
from pdserve.model.attention import AttentionMetadata, paged_attention, write_kv
from pdserve.model.rope import RotaryEmbedding, apply_rope, rotate
from pdserve.model.small_linear import project

if TYPE_CHECKING:
    from pdserve.model.prefill_ops import PrefillOps

# Fused parameter -> the Hugging Face parameters stacked in it (row-wise, in this order).
FUSED: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # Hugging Face's formula in five ops (torch's rms_norm is no single kernel on a CPU).
            var = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * var.add_(self.eps).rsqrt_())
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.q_size, self.kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.qkv_proj = nn.Linear(s.hidden_size, self.q_size + 2 * self.kv_size, bias=s.attention_bias)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=False)
        if s.qk_norm:
            self.q_norm = RMSNorm(s.head_dim, s.rms_norm_eps)
            self.k_norm = RMSNorm(s.head_dim, s.rms_norm_eps)
        self.qk_norm = s.qk_norm
        self.scale = s.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = project(self.qkv_proj, x, meta.native_linear)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        assert meta.cos is not None and meta.sin is not None
        if self.qk_norm:
            q, k, _ = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self.q_norm(q.view(t, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(t, self.num_kv_heads, self.head_dim))
            q, k = apply_rope(q, k, meta.cos, meta.sin)
        else:
            # q and k sit side by side in the fused output: rotate both heads' sets in one pass.
            qk = rotate(qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim), meta.cos, meta.sin)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        write_kv(cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k, v, cache, meta, self.scale)
        return project(self.o_proj, o.reshape(t, -1), meta.native_linear)


class MLP(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(s.hidden_size, 2 * s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, native: bool = False) -> torch.Tensor:
        gate, up = project(self.gate_up_proj, x, native).chunk(2, dim=-1)
        return project(self.down_proj, F.silu(gate) * up, native)


class DecoderLayer(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.self_attn = Attention(s)
        self.mlp = MLP(s)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)

    def forward(self, x: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x), meta.native_linear)


class Backbone(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        # An empty weight: no normal_ init (the loader fills every weight), which on the meta device
        # would import torch._dynamo (~1.5 s of a worker's start).
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size, _weight=torch.empty(s.vocab_size, s.hidden_size))
        self.layers = nn.ModuleList([DecoderLayer(s) for _ in range(s.num_layers)])
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class CausalLM(nn.Module):
    """The whole model: packed tokens in, hidden states out; `logits` for the rows that sample."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.shape = shape
        self.model = Backbone(shape)
        self.rope = RotaryEmbedding(shape.head_dim, shape.rope_theta, shape.rope_scaling)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        layer_done: Callable[[int], None] | None = None,
        prefill_ops: PrefillOps | None = None,
        keep_rows: torch.Tensor | None = None,
        keep_native: bool = False,
    ) -> torch.Tensor:
        """`layer_done(i)` runs once layer i's K/V are in the cache (the KV streaming hook).
        prefill_ops: the element-wise ops of a step that is not fused run natively (the runner's choice).
        keep_rows: with prefill_ops, the rows whose hidden states are wanted (the rest are dropped after
        the last layer's attention, and the result has only these rows; keep_native: their projections
        by the small-batch kernel); ignored otherwise."""
        x = self.model.embed_tokens(input_ids)
        if meta.cos is None:  # the runner fills these once per step; direct callers may not
            cos, sin = self.rope.table(positions)
            meta.cos, meta.sin = cos.to(x.dtype), sin.to(x.dtype)
        fused = meta.fused if isinstance(meta, AttentionMetadata) else None  # not in a CUDA graph's DecodeMetadata
        if prefill_ops is not None:  # x is this step's own (the embedding's output): updated in place
            assert fused is None, "prefill_ops are for the steps that are not fused"
            return prefill_ops.forward(self.model, x, kv_caches, meta, layer_done, keep_rows, keep_native)
        if fused is not None:  # x: as above
            assert meta.native is not None and meta.cos is not None and meta.sin is not None
            fused.start(x, meta.slot_mapping, meta.cos, meta.sin, meta.native)
        for i, layer in enumerate(self.model.layers):
            if fused is not None:
                fused.layer(i, kv_caches[i])
            else:
                x = layer(x, kv_caches[i], meta)
            if layer_done is not None:
                layer_done(i)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor, native: bool = False) -> torch.Tensor:
        """native: by the small-batch kernel (the caller checks it applies), else F.linear."""
        return project(self.lm_head, hidden, native).float()
