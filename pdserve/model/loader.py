"""Build a model: weights from safetensors (single or sharded), or dummy weights for catalog names."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pdserve.config.model import CATALOG, ModelConfigError, ModelShape, resolve_shape
from pdserve.model.llama import CausalLM
from pdserve.model.rope import inv_frequencies

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _safetensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelConfigError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_model(
    model: str, dtype: str | None = None, device: str = "cpu", seed: int = 0
) -> tuple[CausalLM, ModelShape]:
    """A catalog name gets seeded random weights (vLLM's dummy format); a folder its checkpoint."""
    shape = resolve_shape(model, dtype)
    torch_dtype = TORCH_DTYPES[shape.dtype]
    with torch.device("meta"):
        net = CausalLM(shape)
    net = net.to_empty(device=device).to(torch_dtype)
    if shape.tie_word_embeddings:
        net.lm_head.weight = net.model.embed_tokens.weight
    # Buffers built on the meta device hold no data: compute the RoPE frequencies for real.
    net.rope.inv_freq = inv_frequencies(shape.head_dim, shape.rope_theta, shape.rope_scaling).to(device)
    if model in CATALOG:
        _dummy_weights(net, seed)
    else:
        _load_safetensors(net, Path(model))
    return net.eval(), shape


def _dummy_weights(net: CausalLM, seed: int) -> None:
    """Seeded N(0, 0.02) weights. On a GPU they are drawn there (an 8B model in seconds, not
    minutes), so the same seed gives other values on CPU and GPU; each is deterministic."""
    device = next(net.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif device.type == "cpu":
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(p.dtype))
            else:
                p.normal_(0.0, 0.02, generator=gen)


def _load_safetensors(net: CausalLM, folder: Path) -> None:
    from safetensors.torch import load_file

    params = dict(net.named_parameters())
    seen: set[str] = set()
    with torch.no_grad():
        for f in _safetensor_files(folder):
            for name, tensor in load_file(str(f)).items():
                if name not in params:
                    if "rotary_emb" in name:
                        continue
                    raise ModelConfigError(f"{f.name}: unexpected weight {name!r}")
                p = params[name]
                if tuple(p.shape) != tuple(tensor.shape):
                    raise ModelConfigError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(p.shape)}")
                p.copy_(tensor.to(p.dtype))
                seen.add(name)
    missing = set(params) - seen
    if net.shape.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ModelConfigError(f"{folder}: missing weights {sorted(missing)[:5]}")
