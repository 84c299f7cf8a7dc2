"""Between the engine's KV cache (torch) and the transfer plane (bytes)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from pdserve.engine.model_runner import ModelRunner
from pdserve.model.loader import TORCH_DTYPES


class CacheSink:
    """The decode side's `KVSink`: copies verified chunks into reserved cache blocks."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def write(self, layer: int, block_ids: list[int], dtype: str, shape: tuple[int, ...], data: memoryview) -> None:
        if dtype != self.runner.shape.dtype:
            raise ValueError(f"KV of dtype {dtype} sent to a {self.runner.shape.dtype} cache")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only buffer is fine: write_blocks copies it
            raw = torch.frombuffer(data, dtype=torch.uint8)
        self.runner.write_blocks(layer, block_ids, raw.view(TORCH_DTYPES[dtype]).view(shape))


def blocks_as_array(runner: ModelRunner, layer: int, block_ids: list[int]) -> tuple[np.ndarray, str]:
    """One layer's K and V of some blocks as a contiguous numpy array, and the dtype name to send."""
    t = runner.read_blocks(layer, block_ids)
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the raw 16-bit words
        return t.view(torch.int16).numpy(), "bfloat16"
    return t.numpy(), runner.shape.dtype
