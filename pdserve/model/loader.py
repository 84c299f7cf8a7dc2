"""Build a model: weights from safetensors (single or sharded), or dummy weights for catalog names.

The model is built on the meta device, given its dtype there, and only then materialised on the
target device: no float32 copy first. Checkpoint tensors are read one at a time and copied into
their (possibly fused) parameter's rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pdserve.config.model import CATALOG, ModelConfigError, ModelShape, resolve_shape
from pdserve.model.llama import FUSED, CausalLM
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
        net = CausalLM(shape).to(torch_dtype)
    net = net.to_empty(device=device)
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
    params = dict(net.named_parameters())
    with torch.no_grad():
        # Drawn per Hugging Face parameter, in the unfused order, so the values do not depend on
        # the fusion (the same seed gave these weights before projections were fused).
        for name, rows in hf_parameters(net):
            p = params[name][rows]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif device.type == "cpu":
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(p.dtype))
            else:
                p.normal_(0.0, 0.02, generator=gen)


def hf_parameters(net: CausalLM) -> list[tuple[str, slice]]:
    """(our parameter name, its rows) for each Hugging Face parameter, in module order."""
    return [(ours, rows) for _, (ours, rows) in hf_layout(net).items()]


def hf_layout(net: CausalLM) -> dict[str, tuple[str, slice]]:
    """Hugging Face parameter name -> (our parameter name, the rows of it that hold it)."""
    layout: dict[str, tuple[str, slice]] = {}
    for name, p in net.named_parameters():
        fused = next(((f, parts) for f, parts in FUSED.items() if f"{f}." in name), None)
        if fused is None:
            layout[name] = (name, slice(None))
            continue
        f, parts = fused
        prefix, suffix = name.split(f"{f}.")
        sizes = _part_rows(net, f)
        start = 0
        for part, n in zip(parts, sizes, strict=True):
            layout[f"{prefix}{part}.{suffix}"] = (name, slice(start, start + n))
            start += n
        assert start == p.shape[0], name
    return layout


def _part_rows(net: CausalLM, fused: str) -> tuple[int, ...]:
    s = net.shape
    if fused == "self_attn.qkv_proj":
        return (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim)
    return (s.intermediate_size, s.intermediate_size)


def hf_state_dict(net: CausalLM) -> dict[str, torch.Tensor]:
    """The weights under Hugging Face names (views into the fused parameters; no copies)."""
    params = dict(net.named_parameters())
    return {hf: params[ours][rows] for hf, (ours, rows) in hf_layout(net).items()}


def _load_safetensors(net: CausalLM, folder: Path) -> None:
    from safetensors import safe_open

    params = dict(net.named_parameters())
    layout = hf_layout(net)
    seen: set[str] = set()
    with torch.no_grad():
        for f in _safetensor_files(folder):
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if name not in layout:
                        if "rotary_emb" in name:
                            continue
                        raise ModelConfigError(f"{f.name}: unexpected weight {name!r}")
                    ours, rows = layout[name]
                    p = params[ours][rows]
                    tensor = st.get_tensor(name)
                    if tuple(p.shape) != tuple(tensor.shape):
                        raise ModelConfigError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(p.shape)}")
                    p.copy_(tensor)  # copy_ casts and moves in one pass
                    seen.add(name)
    missing = set(layout) - seen
    if net.shape.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ModelConfigError(f"{folder}: missing weights {sorted(missing)[:5]}")
