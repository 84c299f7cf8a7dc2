"""A model's shape as plain data (no torch), read from a Hugging Face config.json or the catalog.

The engine, the KV-size calculator and the simulator all read the same `ModelShape`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ModelConfigError(ValueError):
    """A model folder or name that pdserve cannot serve."""


@dataclass(frozen=True)
class ModelShape:
    """Everything about a decoder's architecture that compute, memory and KV size depend on."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k
    sliding_window: int | None = None
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.dtype not in DTYPE_BYTES:
            raise ModelConfigError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def max_model_len(self) -> int:
        """Longest sequence served. Sliding-window attention is not implemented, so a model with a
        window is served only up to the window, where full attention gives the same result."""
        if self.sliding_window:
            return min(self.max_position_embeddings, int(self.sliding_window))
        return self.max_position_embeddings

    # ---- sizes -------------------------------------------------------------------------------
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q = h * self.num_heads * d
        kv = 2 * h * self.num_kv_heads * d
        o = self.num_heads * d * h
        bias = (self.num_heads + 2 * self.num_kv_heads) * d if self.attention_bias else 0
        norms = 2 * h + (2 * d if self.qk_norm else 0)
        per_layer = q + kv + o + bias + 3 * h * i + norms
        emb = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + emb + head + h

    def weight_bytes(self, dtype: str | None = None) -> int:
        return self.num_params() * DTYPE_BYTES[dtype or self.dtype]

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """K and V for one token across all layers, grouped-query attention respected."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype or self.dtype]

    def kv_bytes_per_token_mha(self, dtype: str | None = None) -> int:
        """What the same model would need with full multi-head attention (one KV head per query head)."""
        return 2 * self.num_layers * self.num_heads * self.head_dim * DTYPE_BYTES[dtype or self.dtype]

    def flops_per_token(self, context_len: int = 0) -> float:
        """Forward FLOPs for one token: 2 x matmul params, plus attention over `context_len` keys."""
        matmul_params = self.num_params() - self.vocab_size * self.hidden_size  # input embedding is a lookup
        if self.tie_word_embeddings:
            matmul_params += self.vocab_size * self.hidden_size  # ...but the tied head is a matmul
        attn = 4 * self.num_layers * self.num_heads * self.head_dim * context_len
        return 2.0 * matmul_params + attn

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], dtype: str | None = None) -> ModelShape:
        """Build from the dict of a Hugging Face `config.json`."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise ModelConfigError("config.json has no 'architectures' entry")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        # transformers >= 5 keeps theta and scaling together under `rope_parameters`.
        rope = cfg.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if arch == "MistralForCausalLM":
            window = cfg.get("sliding_window")
        else:
            window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
        torch_dtype = dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        if torch_dtype not in DTYPE_BYTES:
            torch_dtype = "float32"
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=window,
            dtype=torch_dtype,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_folder(cls, path: str | Path, dtype: str | None = None) -> ModelShape:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ModelConfigError(f"{path}: no config.json (expected a Hugging Face model folder)")
        return cls.from_hf_config(json.loads(p.read_text()), dtype=dtype)


def _llama3_scaling() -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


# Named shapes, used with dummy weights (vLLM's --load-format dummy) and by the simulator.
# Figures are those of the models' published config.json files.
CATALOG: dict[str, ModelShape] = {
    # ~27M parameters: quick on 2 CPU cores. Vocabulary matches the packaged demo tokenizer.
    "demo": ModelShape(
        architecture="LlamaForCausalLM", hidden_size=512, intermediate_size=1536, num_layers=8,
        num_heads=8, num_kv_heads=4, head_dim=64, vocab_size=4096, max_position_embeddings=2048,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, dtype="float32",
        bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama-3.1-8b": ModelShape(
        architecture="LlamaForCausalLM", hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=_llama3_scaling(), rms_norm_eps=1e-5,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-3-70b": ModelShape(
        architecture="LlamaForCausalLM", hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_ids=(128001,),
    ),
    "llama-3.1-70b": ModelShape(
        architecture="LlamaForCausalLM", hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=_llama3_scaling(), rms_norm_eps=1e-5,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "qwen2.5-7b": ModelShape(
        architecture="Qwen2ForCausalLM", hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, vocab_size=152064, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=True, eos_token_ids=(151645,),
    ),
    "qwen3-8b": ModelShape(
        architecture="Qwen3ForCausalLM", hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, qk_norm=True, eos_token_ids=(151645,),
    ),
    "mistral-7b": ModelShape(
        architecture="MistralForCausalLM", hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=32768, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,),
    ),
}


def resolve_shape(model: str, dtype: str | None = None) -> ModelShape:
    """A catalog name or a Hugging Face folder -> its shape."""
    if model in CATALOG:
        shape = CATALOG[model]
        if dtype:
            shape = ModelShape(**{**asdict(shape), "dtype": dtype})
        return shape
    if Path(model).is_dir():
        return ModelShape.from_folder(model, dtype=dtype)
    raise ModelConfigError(
        f"unknown model {model!r}: not a folder with config.json and not one of {', '.join(CATALOG)}"
    )
