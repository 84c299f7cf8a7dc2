"""Tiny random-weight models in Hugging Face format, one per supported architecture, made on the spot."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = [
    "Prefill runs on one pool of workers and decode on another.",
    "The KV cache moves between them, block by block, layer by layer.",
    "A router in front speaks the OpenAI API and streams tokens back.",
    "Hello world! The quick brown fox jumps over the lazy dog 0123456789.",
] * 8

# Each entry: (architecture, config overrides). Odd sizes, GQA, tied and untied heads.
ARCHS: dict[str, dict] = {
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=72, num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=136, tie_word_embeddings=False, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=120, tie_word_embeddings=True, rope_theta=1000000.0,
    ),
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, intermediate_size=96, tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "mistral": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=48, num_attention_heads=6,
        num_key_value_heads=3, intermediate_size=100, tie_word_embeddings=False, sliding_window=None,
    ),
}


def make_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save config.json, model.safetensors and a trained tokenizer for `arch` under `folder`."""
    import transformers

    from pdserve.model.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXT, vocab_size=320)
    spec = dict(ARCHS[arch])
    cls_name = spec["architectures"][0]
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    cfg = config_cls(
        vocab_size=len(tok), num_hidden_layers=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1,
        **{k: v for k, v in spec.items() if k not in ("architectures", "model_type")},
    )
    cfg.architectures = [cls_name]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
